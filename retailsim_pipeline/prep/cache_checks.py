"""Checks on a built tensor cache: the manifest agrees with the arrays, and nothing leaks.

Plain functions returning a :class:`CheckOutcome`; the Dagster asset checks in
``defs/checks.py`` wrap them, the tests call them directly.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from retailsim_pipeline.config import N_SPECIAL, PAD, CacheConfig
from retailsim_pipeline.prep import cache_build
from retailsim_pipeline.prep.cache import FITTED_ARRAYS, HISTORY_ARRAYS, TensorCache
from retailsim_pipeline.prep.files import file_sha256
from retailsim_pipeline.prep.fitting import FittedTables, basket_csr, fit_train_tables
from retailsim_pipeline.prep.history import customer_sequence
from retailsim_pipeline.prep.samples import PRODUCTS_FILE, SPLITS, read_manifest, scan_samples
from retailsim_pipeline.prep.schema import LABEL_CODES, LABEL_COLUMNS


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    failures: list[str]
    details: dict

    def summary(self) -> str:
        return "ok" if self.passed else "; ".join(self.failures)


def check_manifest(cache: TensorCache, *, verify_hashes: bool = True) -> CheckOutcome:
    """The manifest agrees with the arrays: files, shapes, dtypes, hashes, and cross-array invariants."""
    failures: list[str] = []
    m = cache.manifest
    for name, meta in m["arrays"].items():
        arr = cache[name]
        if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
            failures.append(f"{name}: {arr.shape} {arr.dtype} vs manifest {meta['shape']} {meta['dtype']}")
        if verify_hashes and file_sha256(cache.path / meta["file"]) != meta["sha256"]:
            failures.append(f"{name}: sha256 differs from the manifest")
    v, c, s = m["sizes"]["vocab"], m["sizes"]["customers"], m["sizes"]["stores"]
    cfg = CacheConfig(**m["config"])
    expect_widths = {"product": cfg.product_dim, "price": cfg.price_dim, "history": cfg.customer_history_dim,
                     "profile": cfg.customer_profile_dim, "customer": cfg.customer_dim, "store": cfg.store_dim,
                     "temporal": cfg.temporal_dim, "trip": cfg.trip_dim, "context": cfg.context_dim}
    if cache.widths != expect_widths:
        failures.append(f"widths {cache.widths} disagree with the config's {expect_widths}")
    w = cache.widths | expect_widths
    expect = {
        "product_embeddings": (v, w["product"]), "product_log_price": (v,), "customer_context": (c, w["profile"]),
        "store_context": (s, w["store"]),
        **{f"{split}/{name}": (m["splits"][split]["n_samples"], w[name])
           for split in cache.split_names for name in ("temporal", "trip")},
        **{f"{split}/{name}": (m["splits"][split]["n_samples"], cfg.history_items)
           for split in cache.split_names for name in _MEMORY},
    }
    for name, shape in expect.items():
        if tuple(cache[name].shape) != shape:
            failures.append(f"{name}: shape {cache[name].shape}, expected {shape}")
    for name in m["arrays"]:  # every float array, split arrays included: no NaN/Inf may reach the model
        arr = cache[name]
        if np.issubdtype(arr.dtype, np.floating) and arr.size and not np.isfinite(arr).all():
            failures.append(f"{name}: holds {int((~np.isfinite(arr)).sum()):,} NaN/Inf value(s)")
    for split in SPLITS:
        a = cache.split(split)
        n, info = len(a), m["splits"][split]
        if n != info["n_samples"] or int(a.offsets[-1]) != len(a.tokens) or len(a.tokens) != info["n_tokens"]:
            failures.append(f"{split}: {n} samples / {len(a.tokens)} tokens disagree with offsets or manifest")
        if np.any(np.diff(a.offsets) < 1):
            failures.append(f"{split}: a basket has no tokens")
        for name, bound in (("tokens", v), ("customer_index", c), ("store_index", s)):
            arr = a.__getattribute__(name)
            if len(arr) and (int(arr.min()) < 0 or int(arr.max()) >= bound):
                failures.append(f"{split}/{name}: values outside [0, {bound})")
        for name in ("temporal", "trip", "labels", "customer_index", "basket_id", "n_lines", "week", "customer_key",
                     "past_baskets", *_MEMORY):
            if a.__getattribute__(name).shape[0] != n:
                failures.append(f"{split}/{name}: {a.__getattribute__(name).shape[0]} rows for {n} samples")
        key, past = np.asarray(a.customer_key), np.asarray(a.past_baskets)
        if len(key) == len(past) and n and (key.min() < 0 or past.min() < 0 or (past[key == 0] != 0).any()):
            failures.append(f"{split}: customer_key / past_baskets negative, or an anonymous basket with a past")
        h_tok, h_cnt = np.asarray(a.history_tokens), np.asarray(a.history_counts)
        if h_tok.shape == h_cnt.shape and h_tok.size and (
                h_tok.min() < 0 or h_tok.max() >= v or ((h_tok == PAD) != (h_cnt == 0)).any()):
            failures.append(f"{split}/history_tokens: outside [0, {v}), or PAD slots and zero counts disagree")
        h_rec, h_dec = np.asarray(a.history_recency), np.asarray(a.history_decayed)
        if h_dec.shape == h_cnt.shape == h_rec.shape and len(past) == len(h_cnt) and h_dec.size and (
                (h_dec < 0).any() or (h_dec > 1).any() or ((h_dec > 0) != (h_cnt > 0)).any()
                or ((h_rec.astype(np.int64) >= past[:, None]) & (h_cnt > 0)).any()):
            failures.append(f"{split}/history_decayed, history_recency: a decayed share outside (0, 1] at a filled "
                            "slot (or non-zero at an empty one), or a recency of at least the customer's past baskets")
        if len(a.line_log_price_ratio) != len(a.tokens) or len(a.line_quantity) != len(a.tokens):
            failures.append(f"{split}: line arrays are not aligned with tokens")
    return CheckOutcome(not failures, failures, {"arrays": len(m["arrays"]), "vocab": v, "customers": c,
                                                  "stores": s})


#: Largest absolute difference allowed between a cached float table and its refit. The refit runs the
#: same seeded code on the same rows, so it is bit-identical on one machine; the margin only absorbs
#: BLAS summation order on another (a table fitted on other rows moves by orders of magnitude more).
FLOAT_TOLERANCE = 1e-5

#: The frames fitted beside the arrays (refit and compared like them).
FITTED_FRAMES: tuple[str, ...] = ("vocabulary", "customers", "stores")


def check_leakage(cache: TensorCache, samples_dir: Path, *, n_probe: int = 200, seed: int = 0,
                  full_memory: bool = False) -> CheckOutcome:
    """Nothing fitted saw a validation/test basket, and nothing of a basket at or after its time reached
    its features (issue 11 §3). Everything is recomputed from the samples re-read from ``samples_dir``.

    1. Refit: every fitted table (vocabulary, product embeddings and log prices, product neighbours,
       customer profile, store context, the customer and store indices) is fitted again from the train
       split alone and must equal the cached one — integer tables and frames exactly, float tables
       within :data:`FLOAT_TOLERANCE`. A table fitted on anything else fails, named, with the size of
       the difference.
    2. History arrays (:data:`~.cache.HISTORY_ARRAYS`), compared exactly, a failure naming the split,
       the array and how many rows differ: ``customer_key`` and ``past_baskets`` of every basket are
       recomputed (:func:`~.history.customer_sequence`), and ``past_baskets`` is also counted afresh
       (the customer's baskets strictly before, by date, hour, basket id) and ``customer_key`` must
       name one customer per key (0 = anonymous). The memory (``history_tokens``, ``_counts``, ``_recency``,
       ``_decayed``) is recomputed by the builder's own :func:`~.cache_build.build_history` for the probe customers'
       baskets of every split — or every basket with ``full_memory`` (as slow as the build's memory:
       ~25 s on the real data, hence not the default).
    3. Time rule, by perturbation: ``n_probe`` (≥ 1) carded customers with ≥ 3 baskets (seeded), one
       probe basket each with earlier and later baskets. At the probe's time t, *every* basket of the
       customer at or after t is changed (products, spend, quantities, line count, the four labels;
       the later ones also move a week on, for a leak through their time) and the trip context and the history arrays are recomputed with the builder's functions
       (``cache_build.trip_features_all``, ``cache_build.build_history``: a leak in the builder's code
       shows here, a cache that is not what that code computes shows in 2). The probe basket and every
       basket before t must keep all of them exactly; and for every probe some later basket must
       change — else the perturbation proved nothing, which fails too (as do samples without a
       customer to probe).

    Why the probe customers' baskets suffice for 2–3: a basket's history features are functions of its
    own customer's baskets alone (the trip context's cumulative sums run over ``cust_code``, the
    memory's over ``customer_key``; only the numbering of ``customer_key`` involves other customers,
    and it is compared in full). So the subset yields exactly the cached values — which the unperturbed
    comparison checks rather than assumes — at a few percent of the cost of the whole data.
    """
    if n_probe < 1:
        raise ValueError(f"n_probe = {n_probe}: the time-rule check needs at least one probed basket")
    samples_dir = Path(samples_dir)
    version = read_manifest(samples_dir)["data_version"]
    if version != cache.manifest["upstream"]["basket_samples"]:
        return CheckOutcome(False, [f"{samples_dir} holds samples version {version}, the cache was built from "
                                    f"{cache.manifest['upstream']['basket_samples']}: nothing to compare with"], {})
    t0 = time.perf_counter()
    frames = {s: scan_samples(samples_dir, s).collect() for s in SPLITS}
    config = CacheConfig(**cache.manifest["config"])
    refit = fit_train_tables(frames["train"], pl.read_parquet(samples_dir / PRODUCTS_FILE), config)
    failures = _refit_differences(cache, refit)
    details: dict = {"refit_tables": len(FITTED_ARRAYS) + len(FITTED_FRAMES), "refit_differences": len(failures),
                     "seconds_refit": round(time.perf_counter() - t0, 2)}
    misaligned = [f"{s}/basket_id: the cache's baskets are not the samples' in their order"
                  for s in SPLITS if not np.array_equal(np.asarray(cache.split(s).basket_id),
                                                        frames[s].get_column("basket_id").to_numpy())]
    if misaligned:
        return CheckOutcome(False, failures + misaligned, details)

    t1 = time.perf_counter()
    seq_failures, past = _sequence_differences(cache, frames)
    failures += seq_failures
    if full_memory:
        csr = {s: refit.train_csr if s == "train" else basket_csr(frames[s], refit.vocabulary) for s in SPLITS}
        fresh = cache_build.build_history(frames, csr, config.history_items, config.memory_decay)
        for s in SPLITS:
            rows = np.arange(frames[s].height)
            failures += _row_differences(cache, s, rows, {n: fresh[s][n] for n in _MEMORY}, "")
    details |= {"sequence_checked_baskets": int(sum(f.height for f in frames.values())),
                "seconds_sequence": round(time.perf_counter() - t1, 2)}

    t2 = time.perf_counter()
    probe_failures, probe_details = _time_rule(cache, frames, past, refit, config, n_probe, seed,
                                               check_memory=not full_memory)
    details |= probe_details | {"seconds_time_rule": round(time.perf_counter() - t2, 2)}
    failures += probe_failures
    return CheckOutcome(not failures, failures, details)


def refit_differences(cache: TensorCache, samples_dir: Path) -> list[str]:
    """One line per fitted table of ``cache`` that differs from its refit on the train split of ``samples_dir``."""
    train = scan_samples(samples_dir, "train").collect()
    products = pl.read_parquet(Path(samples_dir) / PRODUCTS_FILE)
    return _refit_differences(cache, fit_train_tables(train, products, CacheConfig(**cache.manifest["config"])))


def _refit_differences(cache: TensorCache, refit: FittedTables) -> list[str]:
    out = []
    for name in FITTED_ARRAYS:
        cached, fresh = np.asarray(cache[name]), getattr(refit, name)
        if cached.shape != fresh.shape:
            out.append(f"{name}: shape {cached.shape}, refit on the train split {fresh.shape}")
        elif np.issubdtype(fresh.dtype, np.integer):
            if (bad := int((cached != fresh).sum())):
                out.append(f"{name}: {bad:,} of {fresh.size:,} values differ from the refit on the train split")
        else:
            diff = np.abs(cached.astype(np.float64) - fresh.astype(np.float64))
            if not diff.max(initial=0.0) <= FLOAT_TOLERANCE:  # NaN fails too
                out.append(f"{name}: max |difference| {diff.max():.3g} ({int((diff > FLOAT_TOLERANCE).sum()):,} of "
                           f"{fresh.size:,} values) from the refit on the train split")
    for name in FITTED_FRAMES:
        cached, fresh = getattr(cache, name)(), getattr(refit, name)
        if cached.columns != fresh.columns or cached.height != fresh.height:
            out.append(f"{name}: {cached.height} rows {cached.columns}, refit on the train split "
                       f"{fresh.height} rows {fresh.columns}")
        elif not cached.equals(fresh):
            bad = cached.join(fresh, on=cached.columns, how="anti", nulls_equal=True)
            out.append(f"{name}: {bad.height:,} of {cached.height:,} rows differ from the refit on the train split "
                       f"(e.g. {bad.head(2).rows()})")
    return out


#: The memory part of the history arrays (recomputed for the probe customers, or with ``full_memory``).
_MEMORY: tuple[str, ...] = ("history_tokens", "history_counts", "history_recency", "history_decayed")


def _row_differences(cache: TensorCache, split: str, rows: np.ndarray, fresh: dict[str, np.ndarray],
                     scope: str) -> list[str]:
    """One line per array of ``fresh`` whose values differ from the cache's ``split`` at ``rows``."""
    out = []
    for name, values in fresh.items():
        cached = np.asarray(cache[f"{split}/{name}"])[rows]
        if cached.shape != values.shape:
            out.append(f"{split}/{name}: shape {cached.shape}{scope}, recomputed from the samples {values.shape}")
            continue
        differ = (cached != values).reshape(len(rows), -1).any(axis=1)
        if (bad := int(differ.sum())):
            out.append(f"{split}/{name}: {bad:,} of {len(rows):,} rows{scope} differ from the recomputation from "
                       "the samples")
    return out


def _sequence_differences(cache: TensorCache, frames: dict[str, pl.DataFrame]) -> tuple[list[str], np.ndarray]:
    """Part 2 of :func:`check_leakage` for ``customer_key`` and ``past_baskets`` over every basket:
    failures, and the recomputed ``past_baskets`` (all splits, concatenated)."""
    everything = pl.concat([f.select("basket_id", pl.col("cust_code").cast(pl.String), "date", "hour")
                            for f in frames.values()])
    seq = customer_sequence(everything)
    key, past = seq.get_column("customer_key").to_numpy(), seq.get_column("past_baskets").to_numpy()
    sizes = np.cumsum([0, *(f.height for f in frames.values())])
    failures = []
    for i, s in enumerate(frames):
        lo, hi = sizes[i], sizes[i + 1]
        failures += _row_differences(cache, s, np.arange(hi - lo), {"customer_key": key[lo:hi],
                                                                     "past_baskets": past[lo:hi]}, "")
    # The same two arrays by their definition, without customer_sequence: a key per customer, and the
    # number of the customer's baskets strictly before (date, hour, basket id).
    cached_key = np.concatenate([np.asarray(cache.split(s).customer_key, dtype=np.int64) for s in frames])
    cached_past = np.concatenate([np.asarray(cache.split(s).past_baskets, dtype=np.int64) for s in frames])
    cust = everything.get_column("cust_code")
    carded = cust.is_not_null().to_numpy()
    _, customer = np.unique(cust.fill_null("").to_numpy().astype(str), return_inverse=True)
    pairs = np.unique(np.stack([customer[carded], cached_key[carded]]), axis=1)
    wrong_keys = int((cached_key[~carded] != 0).sum() + (cached_key[carded] <= 0).sum())
    if wrong_keys or len(np.unique(pairs[0])) != pairs.shape[1] or len(np.unique(pairs[1])) != pairs.shape[1]:
        failures.append(f"customer_key: does not give each customer one key of its own and anonymous baskets 0 "
                        f"({wrong_keys:,} baskets with a wrong 0/non-0 key; {pairs.shape[1]:,} (customer, key) "
                        f"pairs for {len(np.unique(pairs[0])):,} customers and {len(np.unique(pairs[1])):,} keys)")
    date = everything.get_column("date").cast(pl.Int32).to_numpy()
    order = np.lexsort((everything.get_column("basket_id").to_numpy(), everything.get_column("hour").to_numpy(),
                        date, customer))
    position = np.arange(len(order))
    first = np.r_[True, customer[order][1:] != customer[order][:-1]]
    counted = np.empty(len(order), dtype=np.int64)
    counted[order] = position - np.maximum.accumulate(np.where(first, position, 0))
    counted[~carded] = 0
    for i, s in enumerate(frames):
        lo, hi = sizes[i], sizes[i + 1]
        if (bad := int((cached_past[lo:hi] != counted[lo:hi]).sum())):
            failures.append(f"{s}/past_baskets: {bad:,} of {hi - lo:,} baskets do not hold the number of their "
                            "customer's baskets strictly before them (by date, hour, basket id)")
    return failures, past


def _perturbed(frame: pl.DataFrame, hit: np.ndarray, later: np.ndarray, codes: list[str]) -> pl.DataFrame:
    """``frame`` with the baskets where ``hit`` changed in everything they hold: each product becomes the
    next of ``codes`` (one outside them: the first), spend ×2 + 0.5, quantities + 1, line count + 1,
    every label the next class; those where ``later`` (after the probe) also a week later (same
    weekday and hour, so their order and their being after the probe are kept)."""
    following = {c: codes[(i + 1) % len(codes)] for i, c in enumerate(codes)}
    on = pl.col("__hit")

    def relabel(label: str, classes: tuple[str, ...]) -> pl.Expr:
        name = pl.col(label).cast(pl.String)
        return (pl.when(on).then(name.replace_strict({c: classes[(i + 1) % len(classes)]
                                                      for i, c in enumerate(classes)}))
                .otherwise(name).cast(frame.schema[label]).alias(label))

    as_text = pl.element().cast(pl.String)
    return frame.with_columns(pl.Series("__hit", hit, dtype=pl.Boolean),
                              pl.Series("__later", later, dtype=pl.Boolean)).with_columns(
        pl.when(pl.col("__later")).then(pl.col("date") + pl.duration(days=7)).otherwise(pl.col("date")).alias("date"),
        pl.when(on).then(pl.col("products").list.eval(as_text.replace_strict(following, default=codes[0])))
        .otherwise(pl.col("products").list.eval(as_text)).alias("products"),
        pl.when(on).then(pl.col("spend").list.eval(pl.element() * 2.0 + 0.5)).otherwise(pl.col("spend")).alias("spend"),
        pl.when(on).then(pl.col("quantity").list.eval(pl.element() + 1)).otherwise(pl.col("quantity"))
        .alias("quantity"),
        pl.when(on).then(pl.col("n_lines") + 1).otherwise(pl.col("n_lines")).alias("n_lines"),
        *(relabel(c.lower(), LABEL_CODES[c]) for c in LABEL_COLUMNS),
    ).drop("__hit", "__later")


def _history_features(frames: dict[str, pl.DataFrame], refit: FittedTables, config: CacheConfig
                      ) -> tuple[dict[str, np.ndarray], list[str]]:
    """The builder's trip context (float32, not yet rounded to the cache's float16) and history arrays of
    ``frames`` (all splits concatenated, in order), with the trip columns' names."""
    ids = pl.DataFrame({"basket_id": np.concatenate([f.get_column("basket_id").to_numpy() for f in frames.values()])})
    trip = ids.join(cache_build.trip_features_all(frames, refit.customers.select("cust_code", "home_store")),
                    on="basket_id", how="left", maintain_order="left").drop("basket_id")
    csr = {s: basket_csr(f, refit.vocabulary) for s, f in frames.items()}
    history = cache_build.build_history(frames, csr, config.history_items, config.memory_decay)
    out = {"trip": trip.to_numpy().astype(np.float32)}
    out |= {name: np.concatenate([history[s][name] for s in frames]) for name in HISTORY_ARRAYS}
    return out, trip.columns


def _time_rule(cache: TensorCache, frames: dict[str, pl.DataFrame], past: np.ndarray, refit: FittedTables,
               config: CacheConfig,
               n_probe: int, seed: int, *, check_memory: bool) -> tuple[list[str], dict]:
    """Part 3 of :func:`check_leakage` (and part 2's memory comparison, on the probe customers): failures,
    details."""
    everything = pl.concat([f.select(pl.col("cust_code").cast(pl.String), "date", "hour", "basket_id")
                            for f in frames.values()]).with_columns(pl.Series("past", past))
    counts = everything.filter(pl.col("cust_code").is_not_null()).group_by("cust_code").len("n").sort("cust_code")
    eligible = counts.filter(pl.col("n") >= 3)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(eligible.height, size=min(n_probe, eligible.height), replace=False))
    chosen = eligible.select(pl.all().gather(pick))
    # One probe per customer, uniform among the baskets with an earlier and a later one.
    chosen = chosen.with_columns(pl.Series("past", 1 + np.floor(rng.random(chosen.height) *
                                                                (chosen.get_column("n").to_numpy() - 2)).astype(np.int64)))
    probes = everything.join(chosen.select("cust_code", "past"), on=["cust_code", "past"], how="semi")
    details: dict = {"probed_baskets": int(probes.height)}
    if probes.height == 0:
        return ["no carded customer with 3 baskets or more to probe: the time-rule check cannot run on these "
                "samples"], details
    times = probes.select("cust_code", pl.col("date").alias("t_date"), pl.col("hour").alias("t_hour"),
                          pl.col("basket_id").alias("t_id"))
    subset, rows = {}, {}
    for s, f in frames.items():
        marked = (f.with_row_index("__row").with_columns(pl.col("cust_code").cast(pl.String).alias("__cust"))
                  .join(times.rename({"cust_code": "__cust"}), on="__cust", how="inner", maintain_order="left"))
        rows[s] = marked.get_column("__row").to_numpy()
        subset[s] = marked.with_columns(
            ((pl.col("date") > pl.col("t_date")) | ((pl.col("date") == pl.col("t_date")) & (
                (pl.col("hour") > pl.col("t_hour")) | ((pl.col("hour") == pl.col("t_hour")) &
                                                       (pl.col("basket_id") >= pl.col("t_id")))))).alias("__after"),
            (pl.col("basket_id") == pl.col("t_id")).alias("__probe"),
        )
    marks = pl.concat([f.select("__cust", "__after", "__probe") for f in subset.values()])
    after, probe = marks.get_column("__after").to_numpy(), marks.get_column("__probe").to_numpy()
    customer = marks.select(pl.col("__cust").rank("dense") - 1).to_series().to_numpy()
    subset = {s: f.drop("__row", "__cust", "t_date", "t_hour", "t_id", "__after", "__probe") for s, f in subset.items()}
    details |= {"probe_customers_baskets": int(len(after)), "perturbed_baskets": int(after.sum())}

    # Unperturbed: the builder's functions on the subset give the cache's values (part 2 on the probe customers).
    base, trip_columns = _history_features(subset, refit, config)
    failures, lo = [], 0
    for s in frames:
        hi = lo + len(rows[s])
        fresh = {"trip": base["trip"][lo:hi].astype(np.float16), "past_baskets": base["past_baskets"][lo:hi]}
        if check_memory:
            fresh |= {n: base[n][lo:hi] for n in _MEMORY}
        failures += _row_differences(cache, s, rows[s], fresh, " (the probe customers')")
        lo = hi
    details["recomputed_equal"] = not failures

    # Perturbed: every basket at or after its customer's probe time.
    codes = refit.vocabulary.filter(pl.col("token_id") >= N_SPECIAL).get_column("PROD_CODE").to_list()
    lo, changed_frames = 0, {}
    for s, f in subset.items():
        changed_frames[s] = _perturbed(f, after[lo:lo + f.height], (after & ~probe)[lo:lo + f.height], codes)
        lo += f.height
    changed, _ = _history_features(changed_frames, refit, config)
    differs = {name: (base[name] != changed[name]).reshape(len(after), -1) for name in base}
    moved = np.zeros(len(after), dtype=bool)
    for name, d in differs.items():
        moved |= d.any(axis=1)
        what = name
        if name == "trip":
            columns = [trip_columns[j] for j in np.flatnonzero(d[probe | ~after].any(axis=0))]
            what = f"trip features ({', '.join(columns[:6])}{', …' if len(columns) > 6 else ''})"
        for where, label, reason in ((probe, "probe baskets", "the basket itself or a later one leaks into it"),
                                     (~after, "baskets before their customer's probe",
                                      "a later basket leaks into them")):
            if (bad := int((d.any(axis=1) & where).sum())):
                failures.append(f"time rule: {what} of {bad:,} of {int(where.sum()):,} {label} change when the probe "
                                f"basket and every later basket of the customer change: {reason}")
    later = after & ~probe
    proved = np.bincount(customer[later & moved], minlength=customer.max() + 1) > 0
    details |= {"later_baskets_changed": int((later & moved).sum()), "later_baskets": int(later.sum()),
                "later_trip_changed": int((later & differs["trip"].any(axis=1)).sum()),
                "later_memory_changed": int((later & np.logical_or.reduce([differs[name] for name in _MEMORY])
                                             .any(axis=1)).sum())}
    if not proved.all():
        failures.append(f"time rule: perturbing the probe basket and every later one changed no later basket's "
                        f"features for {int((~proved).sum()):,} of {len(proved):,} probe customers: the "
                        "perturbation proved nothing")
    details["time_rule_held"] = not any(f.startswith("time rule") for f in failures)
    return failures, details
