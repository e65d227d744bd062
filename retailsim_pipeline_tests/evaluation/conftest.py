"""A realistic ``metrics.json`` document and a training history, shared by the schema and report tests."""

import pytest

from retailsim_pipeline.evaluation.schema import BASELINES, SCHEMA


def ranking(recall10: float, n: int, *, scale: float = 1.0) -> dict:
    """Plausible ranking metrics around a given recall@10 (monotone in K, precision = recall / K here
    because each masked position has one relevant product)."""
    r1 = round(recall10 * 0.35 * scale, 4)
    r5 = round(recall10 * 0.75, 4)
    r20 = round(min(1.0, recall10 * 1.3), 4)
    recall = {1: r1, 5: r5, 10: recall10, 20: r20}
    out = {f"recall@{k}": v for k, v in recall.items()}
    out |= {f"precision@{k}": round(v / k, 4) for k, v in recall.items()}
    out |= {"accuracy": r1, "mrr": round(recall10 * 0.5, 4), "ndcg@10": round(recall10 * 0.6, 4), "n": n}
    return out


def aux_head(labels: list[str], confusion: list[list[int]]) -> dict:
    n = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(len(labels)))
    return {"accuracy": round(correct / n, 4), "macro_f1": round(0.9 * correct / n, 4),
            "confusion": confusion, "labels": labels, "n": n}  # fmt: skip


def comparison(difference: float, half_width: float = 0.006) -> dict:
    """A paired-bootstrap result around ``difference`` (``significance.BootstrapResult.to_dict``)."""
    low, high = difference - half_width, difference + half_width
    return {"difference": difference, "ci_low": low, "ci_high": high, "confidence": 0.95, "n_resamples": 1000,
            "seed": 1234, "n_baskets": 16000, "n_positions": 25000, "significant": low > 0}


@pytest.fixture
def doc() -> dict:
    return sample_doc()


def sample_doc() -> dict:
    recall = {"model": 0.213, "popularity": 0.12, "personal_frequency": 0.165, "cooccurrence": 0.184,
              "blend": 0.196, "tifu_knn": 0.191, "oracle": 0.335}

    def bucket(n: int, shift: float, *, oracle: bool = True) -> dict:
        entry = {name: ranking(round(recall[name] * shift, 4), n) for name in ("model", *BASELINES)}
        entry["oracle"] = ranking(round(recall["oracle"] * shift, 4), n) if oracle else None
        return entry

    model = ranking(recall["model"], 25000)
    model["aux"] = {
        "basket_size": aux_head(["S", "M", "L", "unknown"],
                                [[4100, 600, 90, 10], [700, 5200, 400, 20], [80, 500, 3900, 30], [5, 10, 15, 340]]),
        "price_sensitivity": aux_head(["LA", "MM", "UM", "unknown"],
                                      [[3000, 800, 100, 5], [900, 4800, 700, 10], [150, 900, 3200, 8], [20, 30, 20, 357]]),
        "mission_type": aux_head(["Fill in", "Full Shop", "Small Shop", "Top Up", "XX"],
                                 [[2000, 100, 300, 500, 2], [80, 3100, 200, 90, 1], [400, 300, 2600, 400, 3],
                                  [500, 100, 500, 3700, 4], [5, 5, 5, 5, 93]]),
        "mission_focus": aux_head(["Fresh", "Grocery", "Mixed", "Nonfood", "General", "XX"],
                                  [[1500, 200, 300, 20, 40, 1], [150, 2900, 400, 30, 60, 2], [300, 500, 3300, 80, 90, 3],
                                   [20, 30, 60, 900, 40, 0], [50, 60, 100, 30, 1200, 1], [3, 3, 3, 3, 3, 65]]),
    }  # fmt: skip
    return {
        "schema": SCHEMA,
        "meta": {
            "split": "test", "model_name": "retailsim-world-model", "model_version": "3",
            "model_uri": "models:/retailsim-world-model/3", "mlflow_run_id": "8f2c1e0d9b7a4c3e",
            "cache_key": "c0ffee1234", "n_baskets": 16000, "n_positions": 25000,
            "created": "2025-11-21T08:30:00+00:00", "eval_seed": 1234,
        },  # fmt: skip
        "model": model,
        "baselines": {name: ranking(recall[name], 25000) for name in BASELINES},
        "oracle": ranking(recall["oracle"], 25000),
        "buckets": {
            "cold_start": {"anonymous": bucket(2100, 0.7), "0": bucket(900, 0.6), "1-2": bucket(3400, 0.85),
                           "3-9": bucket(8600, 1.0), "10+": bucket(10000, 1.15)},
            "basket_length": {"2-4": bucket(3000, 0.8), "5-9": bucket(7000, 0.95), "10-19": bucket(9000, 1.05),
                              "20-50": bucket(6000, 1.1)},
            "repeat_vs_explore": {"repeat": bucket(11000, 1.6), "explore": bucket(14000, 0.5)},
        },  # fmt: skip
        "baseline_choice": {
            "split": "validation", "metric": "recall@10", "n_positions": 24000,
            "validation": {"popularity": 0.118, "personal_frequency": 0.17, "cooccurrence": 0.18, "blend": 0.2,
                           "tifu_knn": 0.195},
            "params": {"blend": {"w_cooc": 0.03, "w_pop": 0.0}, "tifu_knn": {"decay": 0.9, "k": 300, "alpha": 0.9}},
            "strongest": "blend",
        },  # fmt: skip
        "significance": {name: comparison(round(recall["model"] - recall[name], 10)) for name in BASELINES},
        "promotion": {
            "metric": "recall@10", "margin": 0.0, "challenger_version": "3", "challenger": 0.213,
            "champion_version": "2", "champion": 0.191, "passed_baseline_check": True, "decision": "champion",
            "reason": "recall@10 0.2130 beats champion 0.1910 by more than the margin 0.0000",
        },  # fmt: skip
    }


@pytest.fixture
def history() -> list[dict]:
    rows = []
    for step in range(0, 1001, 50):
        row = {"step": step, "train/total": 6.0 * 0.998**step + 2.0, "train/lr": min(1.0, step / 200) * 3e-4}
        if step % 200 == 0:
            row["val/loss"] = 6.2 * 0.998**step + 2.1
        rows.append(row)
    return rows
