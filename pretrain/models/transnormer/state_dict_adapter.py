"""Mapping between :class:`TransNormerConfig` / our state dict and the released Hugging Face layout.

The released TransNormerLLM checkpoints (``TransnormerForCausalLM``) name their weights exactly
as our modules do (``model.embed_tokens.weight``, ``model.layers.{i}.token_mixer.qkvu_proj.weight``,
..., ``lm_head.weight``), so the weight mapping is the identity except for tied embeddings:
a tied checkpoint may store only ``model.embed_tokens.weight`` (safetensors drops shared tensors)
and Hugging Face then uses the embedding as the output matrix.

The config keys differ; :func:`config_from_hf` and :func:`config_to_hf` translate them and refuse
the variants the released code supports but this model does not implement.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from pretrain.models.transnormer.config import TransNormerConfig

EMBED_KEY = "model.embed_tokens.weight"
HEAD_KEY = "lm_head.weight"

HF_DEFAULTS: dict[str, Any] = {
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "vocab_size": 64000,
    "init_std": 0.02,
    "decoder_embed_dim": 1024,
    "decoder_layers": 24,
    "decoder_attention_heads": 8,
    "no_scale_embedding": False,
    "norm_type": "simplermsnorm",
    "linear_use_lrpe_list": [],
    "hidden_dim": 1024,
    "linear_act_fun": "silu",
    "glu_dim": 2816,
    "bias": False,
    "tie_word_embeddings": True,
}
"""Values the released ``TransnormerConfig`` (and ``PretrainedConfig``) use for absent keys."""

HF_NORM_EPS = 1e-6
"""The released ``SimpleRMSNorm`` epsilon (not a config key; fixed in their code)."""

_SUPPORTED_ACTS = ("silu", "swish")


class HFConfigError(ValueError):
    """A Hugging Face TransNormerLLM configuration this model cannot represent."""


def _get(hf: dict[str, Any], key: str) -> Any:
    return hf[key] if key in hf else HF_DEFAULTS[key]


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> TransNormerConfig:
    """Translate a released ``config.json`` dict into a :class:`TransNormerConfig`.

    Absent keys take the released ``TransnormerConfig`` defaults (what ``from_pretrained`` does).
    Keys that do not change the function (``bos_token_id``, ``torch_dtype``, ``auto_map`` ...)
    are ignored.

    Args:
        hf: The parsed ``config.json``.
        **overrides: Fields of :class:`TransNormerConfig` not stored in the HF config, such as
            ``attention_block_size``.

    Returns:
        The equivalent config.

    Raises:
        HFConfigError: Naming the key, for ``bias=true``, a ``norm_type`` other than
            ``simplermsnorm``, a ``linear_act_fun`` other than ``silu``, a
            ``linear_use_lrpe_list`` of the wrong length or with values other than 0/1, or LRPE
            with ``hidden_dim != decoder_embed_dim`` (the released code cannot run that).
    """
    if _get(hf, "bias"):
        raise HFConfigError("config.json: bias=true (biased projections) is not implemented; need bias=false")
    norm = _get(hf, "norm_type")
    if norm != "simplermsnorm":
        raise HFConfigError(
            f"config.json: norm_type={norm!r} is not implemented; only 'simplermsnorm' (SRMSNorm) is"
        )
    act = _get(hf, "linear_act_fun")
    if act not in _SUPPORTED_ACTS:
        raise HFConfigError(f"config.json: linear_act_fun={act!r} is not implemented; only 'silu' is")
    d = int(_get(hf, "decoder_embed_dim"))
    n_layers = int(_get(hf, "decoder_layers"))
    heads = int(_get(hf, "decoder_attention_heads"))
    hidden = int(_get(hf, "hidden_dim"))
    glu = int(_get(hf, "glu_dim"))
    if glu == -1:  # the released code's spelling of "same as decoder_embed_dim"
        glu = d
    flags = list(_get(hf, "linear_use_lrpe_list") or [])
    if flags and len(flags) != n_layers:
        raise HFConfigError(
            f"config.json: linear_use_lrpe_list has {len(flags)} entries, need one per layer "
            f"(decoder_layers={n_layers})"
        )
    if any(f not in (0, 1, True, False) for f in flags):
        raise HFConfigError(f"config.json: linear_use_lrpe_list={flags} must hold only 0 and 1")
    lrpe = [i for i, f in enumerate(flags) if f]
    if lrpe and hidden != d:
        raise HFConfigError(
            f"config.json: LRPE layers need hidden_dim == decoder_embed_dim (got hidden_dim={hidden}, "
            f"decoder_embed_dim={d}); the released LRPE is sized by decoder_embed_dim / heads"
        )
    fields: dict[str, Any] = {
        "vocab_size": int(_get(hf, "vocab_size")),
        "d_model": d,
        "n_layers": n_layers,
        "n_heads": heads,
        "hidden_dim": None if hidden == d else hidden,
        "glu_dim": glu,
        "lrpe_layers": lrpe,
        "no_scale_embedding": bool(_get(hf, "no_scale_embedding")),
        "tie_word_embeddings": bool(_get(hf, "tie_word_embeddings")),
        "norm_eps": HF_NORM_EPS,
        "init_std": float(_get(hf, "init_std")),
    }
    fields.update(overrides)
    return TransNormerConfig(**fields)


def config_to_hf(cfg: TransNormerConfig, **extra: Any) -> dict[str, Any]:
    """The released ``config.json`` dict for ``cfg`` (key names of ``TransnormerConfig``).

    Args:
        cfg: Our config.
        **extra: Further keys to write (for example ``pad_token_id``, ``bos_token_id``,
            ``eos_token_id`` or ``torch_dtype``); they override the defaults.

    Returns:
        A JSON-able dict.

    Raises:
        HFConfigError: If ``cfg`` cannot be expressed in the released format: an SRMSNorm epsilon
            other than 1e-6, or LRPE layers with a GLA width other than ``d_model``.
    """
    if cfg.norm_eps != HF_NORM_EPS:
        raise HFConfigError(
            f"norm_eps={cfg.norm_eps} cannot be saved: the released format fixes SRMSNorm eps at {HF_NORM_EPS}"
        )
    if cfg.lrpe_layers and cfg.gla_dim != cfg.d_model:
        raise HFConfigError(
            f"lrpe_layers={cfg.lrpe_layers} with hidden_dim={cfg.gla_dim} != d_model={cfg.d_model} "
            "cannot be saved: the released LRPE is sized by decoder_embed_dim / heads"
        )
    hf: dict[str, Any] = {
        "architectures": ["TransnormerForCausalLM"],
        "model_type": "transnormer",
        "pad_token_id": HF_DEFAULTS["pad_token_id"],
        "bos_token_id": HF_DEFAULTS["bos_token_id"],
        "eos_token_id": HF_DEFAULTS["eos_token_id"],
        "vocab_size": cfg.vocab_size,
        "init_std": cfg.init_std,
        "decoder_embed_dim": cfg.d_model,
        "decoder_layers": cfg.n_layers,
        "decoder_attention_heads": cfg.n_heads,
        "no_scale_embedding": cfg.no_scale_embedding,
        "norm_type": "simplermsnorm",
        "linear_use_lrpe_list": [int(i in cfg.lrpe_layers) for i in range(cfg.n_layers)],
        "hidden_dim": cfg.gla_dim,
        "linear_act_fun": "silu",
        "glu_dim": cfg.glu_dim,
        "bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True,
    }
    hf.update(extra)
    return hf


class TransNormerStateDictAdapter:
    """Converts state dicts between this model and the released Hugging Face layout.

    Args:
        config: The model's config (decides whether embeddings are tied).
    """

    def __init__(self, config: TransNormerConfig) -> None:
        self.config = config

    def to_hf(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Our state dict -> HF names; a tied model stores the shared matrix once (as the embedding)."""
        out = dict(state_dict)
        if self.config.tie_word_embeddings:
            out.pop(HEAD_KEY, None)
        return out

    def from_hf(self, hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """HF state dict -> ours, with ``lm_head.weight`` filled in for a tied model.

        As in Hugging Face, a tied model uses the embedding as output matrix; a stored
        ``lm_head.weight`` that differs from it is ignored with a warning.

        Raises:
            KeyError: If an untied checkpoint has no ``lm_head.weight``, or no embedding at all.
        """
        out = {k: v for k, v in hf_state.items() if k != "decoder.version"}
        if EMBED_KEY not in out:
            raise KeyError(f"checkpoint has no {EMBED_KEY}")
        if self.config.tie_word_embeddings:
            head = out.get(HEAD_KEY)
            emb = out[EMBED_KEY]
            if head is not None and (head.shape != emb.shape or not head.equal(emb)):
                warnings.warn(
                    f"tied checkpoint stores a {HEAD_KEY} different from {EMBED_KEY}; using the "
                    "embedding as output matrix (as Hugging Face does with tie_word_embeddings=true)",
                    stacklevel=2,
                )
            out[HEAD_KEY] = emb
        elif HEAD_KEY not in out:
            raise KeyError(f"checkpoint has no {HEAD_KEY} but config.json sets tie_word_embeddings=false")
        return out
