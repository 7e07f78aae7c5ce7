"""The self-cleaning loop: perplexity scoring with a small evaluation model, thresholding, review.

See :mod:`data_pipeline.selfclean.loop` for the stages and the directory layout.
"""

from data_pipeline.selfclean.config import SelfCleanConfig
from data_pipeline.selfclean.loop import run_selfclean, train_eval_model
from data_pipeline.selfclean.scoring import PerplexityScorer, score_token_lists

__all__ = ["PerplexityScorer", "SelfCleanConfig", "run_selfclean", "score_token_lists", "train_eval_model"]
