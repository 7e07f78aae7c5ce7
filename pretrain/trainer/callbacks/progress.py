"""A progress bar with the latest loss and throughput (main rank only)."""

from __future__ import annotations

from tqdm.auto import tqdm

from pretrain.trainer.callbacks.base import Callback


class ProgressCallback(Callback):
    """Also keeps the first and last collected training loss in ``trainer.results``."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.first_loss: float | None = None

    def pre_train(self) -> None:
        if self.enabled and self.trainer.is_main:
            self.bar = tqdm(
                total=self.trainer.max_steps,
                initial=self.trainer.step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )

    def post_step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "train/loss" in metrics:
            if self.first_loss is None:
                self.first_loss = metrics["train/loss"]
                self.trainer.results.setdefault("initial_loss", self.first_loss)
            self.trainer.results["final_loss"] = metrics["train/loss"]
        if self.bar is not None:
            post = {}
            if "train/loss" in metrics:
                post["loss"] = f"{metrics['train/loss']:.3f}"
            if "throughput/tokens_per_second" in metrics:
                post["tok/s"] = f"{metrics['throughput/tokens_per_second']:.0f}"
            if "eval/perplexity" in metrics:
                post["val_ppl"] = f"{metrics['eval/perplexity']:.1f}"
            if post:
                self.bar.set_postfix(post, refresh=False)

    def state_dict(self) -> dict:
        return {k: self.trainer.results.get(k) for k in ("initial_loss", "final_loss")}

    def load_state_dict(self, state: dict) -> None:
        for key in ("initial_loss", "final_loss"):
            if state.get(key) is not None:
                self.trainer.results[key] = state[key]
        self.first_loss = state.get("initial_loss")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
