"""``metrics.json``, the evaluation report's contract, as pydantic models that validate and document it.

``metrics.json`` (schema :data:`SCHEMA`) is what other tools read. :class:`MetricsDocument` states it
field by field (``MetricsDocument.model_json_schema()`` prints it as JSON Schema, descriptions included);
:func:`validate_metrics` checks a document against it and names the exact key path that is wrong, e.g.
``metrics document: buckets.cold_start.1-2.model: missing key 'n' (expected n, accuracy, …)``.

The shape: ``schema``; ``meta`` (who, what, when; further scalar keys allowed); ``model`` (ranking
metrics plus ``aux``, the four auxiliary heads); ``baselines`` (each baseline's ranking metrics);
``oracle`` (ranking metrics, or ``null`` on real data); ``buckets`` (every bucket of every group, every
scorer in it); ``promotion`` (the champion/challenger decision). Every object has exactly its keys
(``extra="forbid"``) except ``meta``. Metrics are fractions in [0, 1], ``null`` only where ``n`` is 0;
counts are non-negative Python ints (not numpy ones, not floats, not bools); lists are lists.

Keys such as ``recall@10`` or the bucket ``1-2`` are not Python names: their fields carry them as aliases.
"""

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from retailsim_pipeline.config import AUX_HEADS
from retailsim_pipeline.evaluation.buckets import BUCKET_GROUPS

SCHEMA = "retailsim.evaluation/2"  # 2: blend and TIFU-KNN baselines, their validation choice, paired bootstrap

# Ranking metrics every scorer reports on the same masked positions; "n" is the number of positions.
RECALL_KS = (1, 5, 10, 20)
RANKING_METRICS = (
    "accuracy",
    *(f"precision@{k}" for k in RECALL_KS),
    *(f"recall@{k}" for k in RECALL_KS),
    "mrr", "ndcg@10",
)  # fmt: skip
RANKING_KEYS = (*RANKING_METRICS, "n")
BASELINES = ("popularity", "personal_frequency", "cooccurrence", "blend", "tifu_knn")
#: The metric on which the strongest baseline is chosen (validation) and the gate compares (test).
GATE_METRIC = "recall@10"
SCORERS = ("model", *BASELINES, "oracle")
#: How people call each scorer (report tables, plots, schema descriptions).
SCORER_NAMES = {
    "model": "model",
    "popularity": "popularity",
    "personal_frequency": "personal frequency",
    "cooccurrence": "co-occurrence",
    "blend": "blend",
    "tifu_knn": "TIFU-KNN",
    "oracle": "oracle",
}
#: The bucket groups and their labels (defined in :mod:`retailsim_pipeline.evaluation.buckets`).
BUCKETS: dict[str, tuple[str, ...]] = BUCKET_GROUPS
DECISIONS = ("champion", "challenger")


# --------------------------------------------------------------------------------------------------
# Value types: each check raises one error whose message reads like "expected …, got … (type)".
# --------------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _problem(message: str, at: str = "") -> PydanticCustomError:
    """An error for :func:`validate_metrics`; ``at`` extends the failing field's path (``[2]``, ``.oracle``)."""
    return PydanticCustomError("metrics", "{problem}", {"problem": message, "at": at})


def _is_number(value: Any) -> bool:
    # bool is an int subclass but never a metric.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_count(value: Any, handler):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        hint = "; convert numpy integers with int()" if isinstance(value, np.integer) else ""
        raise _problem(f"expected a non-negative integer, got {_describe(value)}{hint}")
    return handler(value)


def _check_fraction_value(value: Any, *, nullable: bool) -> None:
    if value is None and nullable:
        return
    if not _is_number(value) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        hint = ""
        if value is None:
            hint = " (null is allowed only where n is 0)"
        elif nullable and _is_number(value) and math.isnan(value):
            hint = " (NaN is not JSON: write null where n is 0; json_ready(doc) does that)"
        raise _problem(f"expected a number in [0, 1], got {_describe(value)}{hint}")


def _check_fraction(value: Any, handler):
    _check_fraction_value(value, nullable=False)
    return handler(value)


def _check_metric(value: Any, handler, info: ValidationInfo):
    # "n" is declared first, so it is validated (and in info.data) before the metrics that depend on it.
    _check_fraction_value(value, nullable=info.data.get("n") == 0)
    return handler(value)


def _check_labels(value: Any, handler):
    if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
        raise _problem(f"expected a non-empty list of strings, got {_describe(value)}")
    if len(set(value)) != len(value):
        raise _problem(f"labels repeat: {value!r}")
    return handler(value)


def _typed(*types: type | None):
    json_names = {None: "null", bool: "true or false"}
    names = " or ".join(json_names.get(t) or t.__name__ for t in types)
    allowed = tuple(type(None) if t is None else t for t in types)

    def check(value: Any, handler):
        if not isinstance(value, allowed) or isinstance(value, bool) and bool not in allowed:
            raise _problem(f"expected {names}, got {_describe(value)}")
        return handler(value)

    return WrapValidator(check)


def _one_of(choices: tuple[str, ...]):
    expected = f"{choices[0]!r}" if len(choices) == 1 else f"one of {', '.join(choices)}"

    def check(value: Any, handler):
        if not isinstance(value, str) or value not in choices:
            raise _problem(f"expected {expected}, got {_describe(value)}")
        return handler(value)

    return WrapValidator(check)


def _check_finite(value: Any, handler):
    if not _is_number(value) or not math.isfinite(value):
        raise _problem(f"expected a finite number, got {_describe(value)}")
    return handler(value)


def _check_timestamp(value: Any, handler):
    if not isinstance(value, str):
        raise _problem(f"expected str, got {_describe(value)}")
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise _problem(f"expected an ISO-8601 timestamp, got {value!r}") from None
    return handler(value)


def _check_scalar(value: Any, handler):
    if not (value is None or isinstance(value, (str, int, float, bool))):
        raise _problem(f"extra meta values must be scalars, got {_describe(value)}")
    return handler(value)


Count = Annotated[int, Field(ge=0), WrapValidator(_check_count)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0), WrapValidator(_check_fraction)]
#: A ranking or classification metric: a fraction, or null where its object's "n" is 0.
Metric = Annotated[Annotated[float, Field(ge=0.0, le=1.0)] | None, WrapValidator(_check_metric)]
Text = Annotated[str, _typed(str)]
TextOrNull = Annotated[str | None, _typed(str, None)]
Int = Annotated[int, _typed(int)]
Bool = Annotated[bool, _typed(bool)]
Labels = Annotated[list[str], Field(min_length=1), WrapValidator(_check_labels)]
Scalar = Annotated[str | int | float | bool | None, WrapValidator(_check_scalar)]


# --------------------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    """An object with exactly its keys; ``key_word`` names them in errors ("missing scorer 'oracle'")."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    key_word: ClassVar[str] = "key"


class RankingMetrics(_Strict):
    """One scorer's ranking metrics over a set of masked positions (each has one hidden product)."""

    n: Count = Field(description="Masked positions scored. The metrics are null exactly when this is 0.")
    accuracy: Metric = Field(description="Share of positions whose top-ranked product is the hidden one.")
    precision_at_1: Metric = Field(alias="precision@1", description="Hits in the top 1, divided by 1.")
    precision_at_5: Metric = Field(alias="precision@5", description="Hits in the top 5, divided by 5.")
    precision_at_10: Metric = Field(alias="precision@10", description="Hits in the top 10, divided by 10.")
    precision_at_20: Metric = Field(alias="precision@20", description="Hits in the top 20, divided by 20.")
    recall_at_1: Metric = Field(alias="recall@1", description="Share of positions with the hidden product ranked 1st.")
    recall_at_5: Metric = Field(alias="recall@5", description="Share with the hidden product in the top 5.")
    recall_at_10: Metric = Field(alias="recall@10", description="Share with the hidden product in the top 10.")
    recall_at_20: Metric = Field(alias="recall@20", description="Share with the hidden product in the top 20.")
    mrr: Metric = Field(description="Mean reciprocal rank of the hidden product.")
    ndcg_at_10: Metric = Field(alias="ndcg@10", description="NDCG@10 with one relevant product: 1/log2(rank+1) "
                               "within the top 10, else 0.")

    def metric(self, key: str) -> float | None:
        """The value under its ``metrics.json`` key (``"recall@10"``)."""
        return getattr(self, key.replace("@", "_at_"))


assert tuple(a for a in (f.alias or name for name, f in RankingMetrics.model_fields.items()) if a != "n") \
    == RANKING_METRICS


class AuxHeadMetrics(_Strict):
    """Classification metrics of one auxiliary head over the scored baskets."""

    n: Count = Field(description="Baskets scored.")
    accuracy: Metric = Field(description="Share of baskets whose predicted class is the recorded one.")
    macro_f1: Metric = Field(description="F1 averaged over the classes present in the labels or predictions.")
    labels: Labels = Field(description="Class names, in the head's class order (distinct).")
    confusion: list[list[Count]] = Field(description="Counts confusion[actual][predicted], square over labels.")

    @field_validator("confusion", mode="before")
    @classmethod
    def _square(cls, value: Any, info: ValidationInfo) -> Any:
        labels = info.data.get("labels")
        if labels is None:  # the labels' own error is reported
            return value
        k = len(labels)
        if not isinstance(value, list) or len(value) != k:
            raise _problem(f"expected a list of {k} rows (one per label), got {_describe(value)}")
        for i, row in enumerate(value):
            if not isinstance(row, list) or len(row) != k:
                raise _problem(f"expected a list of {k} counts (one per label), got {_describe(row)}", at=f"[{i}]")
        return value


def _fixed_keys(name: str, word: str, doc: str, fields: Mapping[str, tuple[Any, str]]) -> type[_Strict]:
    """A model whose keys are exactly ``fields`` (key → (type, description)), each one required."""
    base = type(f"_{name}Keys", (_Strict,), {"key_word": word, "__doc__": doc})
    return create_model(
        name, __base__=base, __doc__=doc,
        **{f"key_{i}": (type_, Field(alias=key, description=text)) for i, (key, (type_, text)) in enumerate(fields.items())},
    )  # fmt: skip


AuxHeads = _fixed_keys("AuxHeads", "auxiliary head", "The model's auxiliary heads (config.AUX_HEADS).",
                       {head: (AuxHeadMetrics, f"The {head.replace('_', ' ')} head.") for head in AUX_HEADS})


class ModelMetrics(RankingMetrics):
    """The evaluated model: its ranking metrics and its auxiliary heads."""

    aux: AuxHeads = Field(description="One entry per auxiliary head.")


Baselines = _fixed_keys("Baselines", "scorer", "The baselines, scored on the model's positions.",
                        {b: (RankingMetrics, f"{SCORER_NAMES[b]} baseline.") for b in BASELINES})
BucketScorers = _fixed_keys(
    "BucketScorers", "scorer", "Every scorer on the positions of one bucket (oracle null exactly when the "
    "top-level oracle is).",
    {s: (RankingMetrics | None if s == "oracle" else RankingMetrics, SCORER_NAMES[s]) for s in SCORERS},
)
Buckets = _fixed_keys(
    "Buckets", "bucket group", "Every scorer's metrics per bucket of each grouping of the positions.",
    {
        group: (_fixed_keys(f"Buckets_{group}", "bucket", f"The {group.replace('_', ' ')} buckets.",
                            {b: (BucketScorers, f"Positions in bucket {b}.") for b in names}),
                f"Buckets by {group.replace('_', ' ')}.")
        for group, names in BUCKETS.items()
    },
)


class Meta(BaseModel):
    """Who was scored on what, and when. Further scalar keys (e.g. ``mlflow_run_url``) are allowed."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    key_word: ClassVar[str] = "key"
    __pydantic_extra__: dict[str, Scalar] = Field(init=False)

    split: Text = Field(description="The split scored: test or validation.")
    model_name: Text = Field(description="Registered model name.")
    model_version: Text = Field(description="Registered model version (or the CLI's label of a model URI).")
    model_uri: TextOrNull = Field(description="The model URI scored.")
    mlflow_run_id: TextOrNull = Field(description="The training run, where the test metrics are logged.")
    cache_key: Text = Field(description="Content address of the tensor cache scored.")
    n_baskets: Count = Field(description="Baskets with at least one masked position.")
    n_positions: Count = Field(description="Masked positions scored (the model's n).")
    created: Annotated[str, WrapValidator(_check_timestamp)] = Field(description="ISO-8601 timestamp.")
    eval_seed: Int = Field(description="Seed of the evaluation masking.")


class Promotion(_Strict):
    """The champion/challenger decision (``evaluation/promotion.py``)."""

    metric: Annotated[Literal[RANKING_METRICS], _one_of(RANKING_METRICS)] = Field(
        description="Ranking metric compared with the champion.")
    margin: Annotated[float, WrapValidator(_check_finite)] = Field(
        description="The challenger must beat the champion by more than this.")
    challenger_version: Text = Field(description="The version scored (the model).")
    challenger: Fraction = Field(description="The challenger's metric: model.<metric>.")
    champion_version: TextOrNull = Field(description="The current champion; null when there is none yet.")
    champion: Fraction | None = Field(description="The champion's metric on the same positions; null with "
                                      "champion_version.")
    passed_baseline_check: Bool = Field(description="Whether the model beats the strongest baseline significantly "
                                        "(significance.<strongest>.significant).")
    decision: Annotated[Literal[DECISIONS], _one_of(DECISIONS)] = Field(description="What the model becomes.")
    reason: Text = Field(description="Why, in words.")

    @model_validator(mode="after")
    def _consistent(self) -> "Promotion":
        if (self.champion_version is None) != (self.champion is None):
            raise _problem("champion_version and champion must both be null (no champion yet) or both be set")
        if self.decision == "champion" and not self.passed_baseline_check:
            raise _problem("is champion but passed_baseline_check is false (a model that fails the baseline "
                           "check is never promoted)", at=".decision")
        return self


def _keyed(model: BaseModel) -> dict[str, Any]:
    """A model's values under their ``metrics.json`` keys."""
    return {f.alias or name: getattr(model, name) for name, f in type(model).model_fields.items()}


Parameter = Annotated[int | float, WrapValidator(_check_finite)]


ValidationScores = _fixed_keys("ValidationScores", "baseline", "Each baseline's validation metric (tuned ones at "
                               "their chosen settings).", {b: (Fraction, SCORER_NAMES[b]) for b in BASELINES})


class BaselineChoice(_Strict):
    """The baselines' settings and the strongest of them, all chosen on the validation split (never test)."""

    split: Annotated[Literal["validation"], _one_of(("validation",))] = Field(
        description="Where the weights were picked and the baselines ranked: always validation.")
    metric: Annotated[Literal[GATE_METRIC], _one_of((GATE_METRIC,))] = Field(description="The ranking metric.")
    n_positions: Count = Field(description="Masked validation positions each candidate was scored on.")
    validation: ValidationScores = Field(description="Each baseline's metric on the validation positions.")
    params: dict[str, dict[str, Parameter]] = Field(
        description="The chosen settings of each tuned baseline (blend weights, TIFU-KNN decay/k/alpha).")
    strongest: Annotated[Literal[BASELINES], _one_of(BASELINES)] = Field(
        description="The baseline with the best validation metric: the one the gate compares with.")


class Comparison(_Strict):
    """Model − baseline on the test positions, with a paired bootstrap over baskets (``significance.py``)."""

    difference: Annotated[float, WrapValidator(_check_finite)] = Field(
        description="model − baseline, the metric's mean over the same positions.")
    ci_low: Annotated[float, WrapValidator(_check_finite)] = Field(description="Lower end of the interval.")
    ci_high: Annotated[float, WrapValidator(_check_finite)] = Field(description="Upper end of the interval.")
    confidence: Fraction = Field(description="Coverage of the percentile interval (0.95).")
    n_resamples: Count = Field(description="Bootstrap resamples of the baskets (≥ 1,000).")
    seed: Int = Field(description="Seed of the resampling.")
    n_baskets: Count = Field(description="Baskets resampled.")
    n_positions: Count = Field(description="Positions compared (the model's n).")
    significant: Bool = Field(description="ci_low > 0: the model is better beyond the interval.")

    @model_validator(mode="after")
    def _ordered(self) -> "Comparison":
        if not self.ci_low <= self.ci_high:
            raise _problem(f"ci_low {self.ci_low} > ci_high {self.ci_high}", at=".ci_low")
        if self.significant != (self.ci_low > 0):
            raise _problem(f"is {self.significant} but ci_low is {self.ci_low}", at=".significant")
        return self


Significance = _fixed_keys("Significance", "baseline", f"model − each baseline on {GATE_METRIC}, paired bootstrap "
                           "over baskets.", {b: (Comparison, SCORER_NAMES[b]) for b in BASELINES})


class MetricsDocument(_Strict):
    """``metrics.json``: the model, the baselines and the oracle scored on the same masked positions,
    per bucket, and the promotion decision."""

    schema_: Annotated[Literal[SCHEMA], _one_of((SCHEMA,))] = Field(alias="schema", description="Always "
                                                                    f"{SCHEMA!r}.")
    meta: Meta
    model: ModelMetrics
    baselines: Baselines = Field(description="One entry per baseline.")
    oracle: RankingMetrics | None = Field(description="The generator's ground truth as a scorer; null on real data.")
    buckets: Buckets
    baseline_choice: BaselineChoice
    significance: Significance = Field(description=f"model − each baseline on {GATE_METRIC} (test positions).")
    promotion: Promotion

    @model_validator(mode="after")
    def _consistent(self) -> "MetricsDocument":
        """Checks across objects: the oracle is null everywhere or nowhere; every scorer answers the same
        positions (same n); the promotion's challenger value is the model's."""
        n = self.model.n
        if self.meta.n_positions != n:
            raise _problem(f"is {self.meta.n_positions:,} but model.n is {n:,}", at="meta.n_positions")
        others = {f"baselines.{k}": v for k, v in _keyed(self.baselines).items()}
        if self.oracle is not None:
            others["oracle"] = self.oracle
        for path, metrics in others.items():
            if metrics.n != n:
                raise _problem(f"is {metrics.n:,} but model.n is {n:,}: every scorer answers the same positions",
                               at=f"{path}.n")
        for group, buckets in _keyed(self.buckets).items():
            for bucket, scorers in _keyed(buckets).items():
                p = f"buckets.{group}.{bucket}"
                entry = _keyed(scorers)
                if entry["oracle"] is None and self.oracle is not None:
                    raise _problem("is null but the top-level oracle is not", at=f"{p}.oracle")
                if entry["oracle"] is not None and self.oracle is None:
                    raise _problem("must be null when the top-level oracle is null", at=f"{p}.oracle")
                for scorer, metrics in entry.items():
                    if metrics is not None and metrics.n != entry["model"].n:
                        raise _problem(f"is {metrics.n:,} but {p}.model.n is {entry['model'].n:,}: every scorer "
                                       "answers the same positions", at=f"{p}.{scorer}.n")
        for name, comparison in _keyed(self.significance).items():
            if comparison.n_positions != n:
                raise _problem(f"is {comparison.n_positions:,} but model.n is {n:,}", at=f"significance.{name}.n_positions")
            expected = self.model.metric(GATE_METRIC) - _keyed(self.baselines)[name].metric(GATE_METRIC)
            if not math.isclose(comparison.difference, expected, rel_tol=1e-6, abs_tol=1e-9):
                raise _problem(f"is {comparison.difference!r} but model − baseline {GATE_METRIC} is {expected!r}",
                               at=f"significance.{name}.difference")
        strongest = _keyed(self.significance)[self.baseline_choice.strongest]
        if self.promotion.passed_baseline_check != strongest.significant:
            raise _problem(f"is {self.promotion.passed_baseline_check} but significance."
                           f"{self.baseline_choice.strongest}.significant is {strongest.significant}",
                           at="promotion.passed_baseline_check")
        promotion = self.promotion
        model_value = self.model.metric(promotion.metric)
        if model_value is None or not math.isclose(promotion.challenger, model_value, rel_tol=1e-9, abs_tol=1e-12):
            raise _problem(f"is {promotion.challenger!r} but model.{promotion.metric} is {model_value!r}",
                           at="promotion.challenger")
        return self


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model class of the object at ``loc`` (keys are aliases), walking down from the document."""
    cls: Any = MetricsDocument
    for part in loc:
        if isinstance(part, int):
            return None
        fields = {f.alias or name: f for name, f in cls.model_fields.items()}
        if part not in fields:
            return None
        annotation = fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return None
    return cls


def _message(error: Mapping) -> str:
    loc, kind = tuple(error["loc"]), error["type"]
    if kind == "metrics":
        at = error["ctx"]["at"]
        path = _path(loc) + at if loc else at
        return f"{path or 'document'}: {error['ctx']['problem']}"
    if kind in ("missing", "extra_forbidden") and loc:
        parent = _model_at(loc[:-1])
        word = getattr(parent, "key_word", "key")
        expected = f" (expected {', '.join(_keyed_names(parent))})" if parent is not None else ""
        verb = "missing" if kind == "missing" else "unknown"
        return f"{_path(loc[:-1]) or 'document'}: {verb} {word} {loc[-1]!r}{expected}"
    path = _path(loc) or "document"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path}: expected an object, got {_describe(error['input'])}"
    return f"{path}: {error['msg']}, got {_describe(error['input'])}"


def _keyed_names(cls: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in cls.model_fields.items()]


def validate_metrics(doc: Any) -> None:
    """Raise ``ValueError`` naming the key path that breaks the ``metrics.json`` contract
    (:class:`MetricsDocument`), e.g. ``metrics document: model.recall@10: expected a number in [0, 1],
    got '0.21' (str)``; return ``None`` when ``doc`` conforms. Run :func:`json_ready` first on a fresh
    evaluation result: its empty buckets carry NaN, which the contract writes as null."""
    try:
        MetricsDocument.model_validate(doc)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise ValueError(f"metrics document: {_message(errors[0])}{more}") from None


def json_ready(doc: Any) -> Any:
    """A copy of ``doc`` in which the NaN metrics of every empty object (``"n": 0``, e.g. a bucket no
    position fell into) are ``null``: NaN is not JSON, and the contract says "no value" with null.
    NaN anywhere else is kept, for :func:`validate_metrics` to reject."""
    if isinstance(doc, Mapping):
        empty = doc.get("n") == 0
        return {
            k: None if empty and isinstance(v, float) and math.isnan(v) else json_ready(v) for k, v in doc.items()
        }
    if isinstance(doc, list):
        return [json_ready(v) for v in doc]
    return doc
