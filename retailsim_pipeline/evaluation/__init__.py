"""Evaluation (DESIGN §7): deterministic masked positions, ranking and classification metrics, and the
baselines scored on the same positions as the world model. Never imports dagster or mlflow.

``positions``  which lines of a split are hidden and scored; the matching model batch
``metrics``    target ranks → precision/recall@K, accuracy, MRR, NDCG@10; classification metrics
``significance`` paired bootstrap over baskets: is one scorer significantly better than another
``baselines``  popularity, personal frequency and item co-occurrence scorers
``strong_baselines``  the blend of those three and TIFU-KNN (decayed personal vectors + nearest customers)
``tuning``     the strong baselines' parameters chosen on the validation split
``buckets``    the bucket groups (cold start, basket length, repeat/explore): edges, labels, bucketing
``gate``       the strongest baseline (chosen on validation) and model − each baseline with its interval
``schema``     ``metrics.json`` as pydantic models; ``validate_metrics``
``promotion``  the champion/challenger rule and the ``metrics.json`` document
``report``     markdown, HTML and terminal renderings (tables: ``report_tables``, plots: ``plots``), files
"""

from retailsim_pipeline.evaluation.baselines import CooccurrenceScorer, PersonalFrequencyScorer, PopularityScorer
from retailsim_pipeline.evaluation.metrics import (
    Ranks,
    classification_metrics,
    grouped_ranking_metrics,
    position_recall,
    ranking_metrics,
    target_ranks,
)
from retailsim_pipeline.evaluation.positions import EvalPositions, eval_positions, masked_batch, visible_tokens
from retailsim_pipeline.evaluation.significance import BootstrapResult, paired_bootstrap
from retailsim_pipeline.evaluation.strong_baselines import BlendScorer, TifuKnnScorer

__all__ = [
    "BlendScorer", "BootstrapResult", "CooccurrenceScorer", "EvalPositions", "PersonalFrequencyScorer",
    "PopularityScorer", "Ranks", "TifuKnnScorer", "classification_metrics", "eval_positions",
    "grouped_ranking_metrics", "masked_batch", "paired_bootstrap", "position_recall", "ranking_metrics",
    "target_ranks", "visible_tokens",
]
