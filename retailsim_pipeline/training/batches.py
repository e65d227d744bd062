"""Batch assembly: bucketed, seeded, vectorized batches of one split of the tensor cache (DESIGN §4, §6).

:class:`BatchAssembler` turns sample indices of a split into a :class:`~retailsim_pipeline.training.batch.Batch`.

Contract
--------
* **Bucketing.** An epoch's batches each hold baskets of one length bucket (``buckets`` are the upper
  bounds: 1–10, 11–20, 21–30, 31–50), and a batch is padded only to its own longest basket. Most
  baskets are short, so without bucketing a batch of short baskets would pay for the one long basket
  that happens to land in it; bucketing cuts the padding (and the model's work) several-fold.
* **Order.** :meth:`BatchAssembler.epoch_batches` is a pure function of ``(seed, epoch)``: samples are
  shuffled within their bucket, chunked into ``batch_size`` (each bucket's last, partial batch kept
  unless ``drop_last``), and the batch order shuffled so buckets interleave. Every sample appears
  exactly once per epoch. ``shuffle=False`` keeps sample order within buckets and bucket order.
* **Masking.** :meth:`BatchAssembler.assemble` masks with ``np.random.default_rng(mask_seed)``;
  :meth:`BatchAssembler.iterate` uses ``mask_seed = (seed, epoch, batch_no)``. A batch is therefore
  a pure function of ``(seed, epoch, batch_no)``: a resumed run (``start_batch=k``) sees exactly the
  batches and masks it would have seen, and the fixed validation subset (``max_samples`` with
  ``shuffle=False``) gets identical masked positions for every model and every validation, so
  validation losses are comparable across runs.
  Each real position is chosen with probability ``mask_prob``; a basket of length ≥ 2 with no chosen
  position gets one chosen uniformly among its positions (so every such basket contributes to the
  loss); a basket of length 1 is chosen with probability ``mask_prob`` like any position. Chosen
  positions: 80 % → MASK, 10 % → a random product token, 10 % → unchanged (BERT). ``mask_prob=0``
  chooses nothing at all (unmasked inputs, e.g. for embedding extraction).
* **Price.** ``price_features(line_log_price_ratio, product_log_price[token], price width)`` of the
  line, zero at padding and at chosen positions: a line's price would give its product away. The
  width is the cache's (``cache.widths["price"]``, 64 by default).
* **Context.** history_vector(memory) | customer_context[customer] | temporal | store_context[store] |
  trip → [B, 400] float32 (``cache.widths["context"]``): the first part is the mean product embedding
  of the sample's point-in-time memory (:func:`~retailsim_pipeline.prep.features.history_vector`).
* **Memory.** ``history_tokens`` / ``history_counts`` [B, K]: the customer's products (largest decayed share
  first) strictly before the basket (:mod:`~retailsim_pipeline.prep.history`), read as stored: nothing of the
  basket itself is in them, in any split; ``history_past`` [B]: how many baskets they come from; ``history_recency`` /
  ``history_decayed`` [B, K]: baskets since each was last bought, its decayed share of the earlier baskets.

Everything is gathered with vectorized numpy indexing — no Python loop over samples. The small
per-sample arrays (offsets, lengths, customer/store index, labels) and the small tables (customer,
store context, product log price) are copied to RAM once; tokens, line prices, temporal and trip
features stay memory-mapped (the OS page cache keeps the hot ones resident).
"""

import logging
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from retailsim_pipeline.config import BATCH_LENGTH_BOUNDS, MASK, N_SPECIAL, PAD
from retailsim_pipeline.prep.cache import SplitArrays, TensorCache, advise_random
from retailsim_pipeline.prep.features import history_vector, price_features
from retailsim_pipeline.model.batch import IGNORE_INDEX, Batch

log = logging.getLogger(__name__)

#: Of the chosen positions: this share becomes MASK, the next share a random product, the rest unchanged.
MASK_TOKEN_SHARE, RANDOM_TOKEN_SHARE = 0.8, 0.1


def _price_tables(product_log_price: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """What :func:`price_features` needs per batch, precomputed: ([V, dim / 2] product half,
    [dim / 4] ratio frequencies).

    ``price_features`` encodes the line's log price ratio in its first half and the product's log
    price in its second, each half depending on its own input only. The product half is a function
    of the token, so it is tabled once; the ratio half is computed per batch straight into the
    output (no temporaries: ~5x faster than calling ``price_features`` on a long batch). The
    frequencies are checked against ``price_features`` here, so a change of the encoding in the
    cache module fails loudly instead of silently diverging.
    """
    q = dim // 4
    zeros = np.zeros(len(product_log_price), np.float32)
    product_code = np.ascontiguousarray(price_features(zeros, product_log_price, dim)[:, 2 * q:])
    freqs = (2.0 ** np.arange(q, dtype=np.float32)) * np.float32(np.pi / 4)
    probe = np.linspace(-3, 3, 257, dtype=np.float32)
    angle = probe[:, None] * freqs
    if not np.array_equal(np.concatenate([np.sin(angle), np.cos(angle)], axis=1),
                          price_features(probe, np.zeros_like(probe), dim)[:, :2 * q]):
        raise RuntimeError("prep.features.price_features changed its ratio encoding; update "
                           "training.batches._price_tables to match")
    return product_code, freqs


#: Seed stream of the line shuffle, apart from the masking's draws (same mask_seed, other numbers).
_SHUFFLE_STREAM = 0x5EED


class BatchAssembler:
    """Bucketed batches of one split of a :class:`TensorCache`; see the module docstring for the contract.

    ``max_samples`` restricts the assembler to a fixed subset: the first ``max_samples`` samples of a
    permutation seeded by ``seed`` (kept in split order for locality), the same for every epoch — the
    fixed validation subset. ``index`` in a batch is always the row in the split.

    ``shuffle_lines`` puts each basket's lines in a random order (seeded by ``mask_seed``, so a resumed
    epoch sees the same order): a basket is a set, and the file's line order can carry information —
    the published LGSR files list most baskets' products sorted by code, so a line hidden in place sits
    between its neighbours' codes and gives its own code range away. Training and validation shuffle;
    the evaluation and serving do not (they never hide a line in place, see
    ``evaluation.positions.completion_batch``).
    """

    def __init__(
        self,
        cache: TensorCache,
        split: str,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        buckets: Sequence[int] = BATCH_LENGTH_BOUNDS,
        max_samples: int | None = None,
        drop_last: bool = False,
        shuffle_lines: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if list(buckets) != sorted(set(buckets)) or not buckets or buckets[0] < 1:
            raise ValueError(f"buckets must be strictly increasing positive upper bounds, got {tuple(buckets)}")
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.shuffle, self.drop_last, self.shuffle_lines = shuffle, drop_last, shuffle_lines
        self.buckets = tuple(int(b) for b in buckets)
        arrays = cache.split(split)

        # Every per-sample and per-line array stays memory-mapped (np.asarray: a plain ndarray over the same
        # mapping, without np.memmap's per-index Python overhead); a batch gathers its rows and casts them,
        # so a full-scale split (tens of millions of baskets) is never copied into RAM. In RAM: the basket
        # lengths (int16) and the order of an epoch.
        self._offsets = np.asarray(arrays.offsets)  # [N + 1] int64
        self._lengths = np.diff(self._offsets).astype(np.int32)  # [N] (≤ max_basket_len)
        self._customer_index = np.asarray(arrays.customer_index)  # [N] int32
        self._store_index = np.asarray(arrays.store_index)  # [N] int32
        self._labels = np.asarray(arrays.labels)  # [N, 4] int8
        self._tokens = np.asarray(arrays.tokens)  # [L] int32
        self._log_ratio = np.asarray(arrays.line_log_price_ratio)  # [L] float32
        self._temporal = np.asarray(arrays.temporal)  # [N, 64] float16
        self._trip = np.asarray(arrays.trip)  # [N, 48] float16
        self._history_tokens = np.asarray(arrays.history_tokens)  # [N, K] int32: the point-in-time memory
        self._history_counts = np.asarray(arrays.history_counts)  # [N, K] uint16
        self._history_recency = np.asarray(arrays.history_recency)  # [N, K] uint16
        self._history_decayed = np.asarray(arrays.history_decayed)  # [N, K] float16
        self._past_baskets = np.asarray(arrays.past_baskets)  # [N] int32
        if shuffle:  # batches gather rows from all over the split: no read-around on page faults
            for name in SplitArrays.__dataclass_fields__:
                advise_random(getattr(arrays, name))
        # Small tables: in RAM (numpy gathers beat torch.index_select at these sizes, see the report).
        self._customer_context = np.ascontiguousarray(cache.customer_context, dtype=np.float32)  # [C, 32]
        self._history_dim = cache.widths["history"]
        self._history_embeddings = np.ascontiguousarray(cache.product_embeddings[:, :self._history_dim],
                                                        dtype=np.float32)  # [V, history]
        self._store_context = np.ascontiguousarray(cache.store_context, dtype=np.float32)  # [S, 96]
        self._product_log_price = np.ascontiguousarray(cache.product_log_price, dtype=np.float32)  # [V]
        self.vocab_size = len(self._product_log_price)
        self.price_dim = cache.widths["price"]
        self._product_price_code, self._ratio_freqs = _price_tables(self._product_log_price, self.price_dim)
        self.context_dim = cache.widths["context"]

        n = len(self._lengths)
        if max_samples is not None and max_samples < n:
            perm = np.random.default_rng(seed).permutation(n)
            self.sample_indices = np.sort(perm[:max_samples])
        else:
            self.sample_indices = np.arange(n, dtype=np.int64)
        lengths = self._lengths[self.sample_indices]
        if len(lengths) and lengths.max() > self.buckets[-1]:
            worst = int(self.sample_indices[np.argmax(lengths)])
            raise ValueError(f"{cache.path}/{split}: sample {worst} has {int(lengths.max())} tokens, more than "
                             f"the last bucket bound {self.buckets[-1]}; add a larger bound to `buckets`")
        bucket_of = np.searchsorted(np.asarray(self.buckets), lengths, side="left")
        # Members of each bucket in split order (a stable sort keeps that order).
        order = np.argsort(bucket_of, kind="stable")
        counts = np.bincount(bucket_of, minlength=len(self.buckets))
        self._bucket_members = np.split(self.sample_indices[order], np.cumsum(counts)[:-1])
        log.debug("batches of %s: %d samples in buckets ≤ %s of %s; %d batches of ≤ %d per epoch", split,
                  self.n_samples, self.buckets, counts.tolist(), len(self), batch_size)

    # ------------------------------------------------------------------ order

    @property
    def n_samples(self) -> int:
        return len(self.sample_indices)

    @property
    def offsets(self) -> np.ndarray:
        """[N + 1] int64, read-only: the split's CSR offsets (basket i's lines are ``offsets[i]:offsets[i + 1]``)."""
        view = self._offsets.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        """Batches per epoch (the same for every epoch)."""
        b = self.batch_size
        return sum(len(m) // b if self.drop_last else -(-len(m) // b) for m in self._bucket_members)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The batches of ``epoch``: int64 arrays of split rows, each within one length bucket."""
        rng = np.random.default_rng((self.seed, epoch))
        batches: list[np.ndarray] = []
        for members in self._bucket_members:
            if self.shuffle:
                members = rng.permutation(members)
            stop = len(members) - len(members) % self.batch_size if self.drop_last else len(members)
            batches += [members[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    # ------------------------------------------------------------------ one batch

    def assemble(self, indices: np.ndarray, *, mask_prob: float, mask_seed: tuple[int, ...]) -> Batch:
        """The :class:`Batch` of split rows ``indices``, masked with ``np.random.default_rng(mask_seed)``."""
        idx = np.asarray(indices, dtype=np.int64)
        lengths = self._lengths[idx].astype(np.int64)  # [B]
        B, S = len(idx), int(lengths.max(initial=1))  # batch, longest basket in this batch
        valid = np.arange(S)[None, :] < lengths[:, None]  # [B, S] real positions
        rows, cols = np.nonzero(valid)  # [M] real positions, row-major: line order within each basket
        flat = rows * S + cols  # [M] into the flattened [B * S]
        line = self._offsets[idx][rows] + cols  # [M] into the CSR line arrays
        if self.shuffle_lines:  # each basket's lines in a random order, seeded like the masking
            keys = np.random.default_rng([*mask_seed, _SHUFFLE_STREAM]).random((B, S))
            keys[~valid] = np.inf
            order = np.argsort(keys, axis=1, kind="stable")  # [B, S]: a permutation of 0..len-1 first
            line = self._offsets[idx][rows] + order[rows, cols]
        original = self._tokens[line].astype(np.int64)  # [M]

        rng = np.random.default_rng(mask_seed)
        chosen = self._choose(lengths, rows, mask_prob, rng)  # [M] bool
        tokens = np.full(B * S, PAD, dtype=np.int64)
        tokens[flat] = original
        targets = np.full(B * S, IGNORE_INDEX, dtype=np.int64)
        flat_chosen = flat[chosen]
        targets[flat_chosen] = original[chosen]
        if len(flat_chosen):
            u = rng.random(len(flat_chosen))
            random_tokens = rng.integers(N_SPECIAL, self.vocab_size, size=len(flat_chosen))
            tokens[flat_chosen] = np.where(
                u < MASK_TOKEN_SHARE, MASK,
                np.where(u < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE, random_tokens, original[chosen]))

        # Price only where the product is visible: real and not chosen.
        keep = ~chosen
        P = self.price_dim  # price feature width
        visible = np.empty((int(keep.sum()), P), dtype=np.float32)  # [K, P]
        angle = self._log_ratio[line[keep]][:, None] * self._ratio_freqs  # [K, P / 4]
        q = P // 4
        np.sin(angle, out=visible[:, :q])
        np.cos(angle, out=visible[:, q:2 * q])
        np.take(self._product_price_code, original[keep], axis=0, out=visible[:, 2 * q:])
        price = np.zeros((B * S, P), dtype=np.float32)
        price[flat[keep]] = visible

        history_tokens = self._history_tokens[idx].astype(np.int64)  # [B, K]
        history_counts = self._history_counts[idx].astype(np.float32)  # [B, K]
        context = np.concatenate([
            history_vector(history_tokens, history_counts, self._history_embeddings),  # [B, 160]
            self._customer_context[self._customer_index[idx]],  # [B, 32]
            self._temporal[idx],  # [B, 64] float16 → float32 by concatenate
            self._store_context[self._store_index[idx]],  # [B, 96]
            self._trip[idx],  # [B, 48]
        ], axis=1, dtype=np.float32)
        return Batch(
            history_tokens=torch.from_numpy(history_tokens),
            history_counts=torch.from_numpy(history_counts),
            history_past=torch.from_numpy(self._past_baskets[idx].astype(np.float32)),
            history_recency=torch.from_numpy(self._history_recency[idx].astype(np.float32)),
            history_decayed=torch.from_numpy(self._history_decayed[idx].astype(np.float32)),
            tokens=torch.from_numpy(tokens.reshape(B, S)),
            targets=torch.from_numpy(targets.reshape(B, S)),
            attention_mask=torch.from_numpy(valid),
            price=torch.from_numpy(price.reshape(B, S, P)),
            context=torch.from_numpy(context),
            labels=torch.from_numpy(self._labels[idx].astype(np.int64)),
            index=torch.from_numpy(idx.copy()),
        )

    @staticmethod
    def _choose(lengths: np.ndarray, rows: np.ndarray, mask_prob: float,
                rng: np.random.Generator) -> np.ndarray:
        """[M] bool over the real positions (row-major): which to predict."""
        if mask_prob <= 0.0:
            return np.zeros(len(rows), dtype=bool)
        B = len(lengths)
        chosen = rng.random(len(rows)) < mask_prob  # [M]
        forced = np.minimum((rng.random(B) * lengths).astype(np.int64), lengths - 1)  # [B] one position each
        any_chosen = np.bincount(rows[chosen], minlength=B) > 0
        need = np.flatnonzero(~any_chosen & (lengths >= 2))
        if len(need):
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # first real position of each row in M
            chosen[starts[need] + forced[need]] = True
        return chosen

    # ------------------------------------------------------------------ an epoch

    def iterate(
        self,
        epoch: int,
        *,
        mask_prob: float,
        start_batch: int = 0,
        batch_numbers: Sequence[int] | None = None,
        prefetch: int = 2,
        device: torch.device | str | None = None,
        pin_memory: bool | None = None,
    ) -> Iterator[tuple[int, Batch]]:
        """Yield ``(batch_no, batch)`` for the batches ``start_batch..`` of ``epoch``, or for exactly
        ``batch_numbers`` (positions in the epoch's order, e.g. one rank's share under DDP: only these
        are assembled).

        ``mask_seed = (seed, epoch, batch_no)``, so resuming at ``start_batch`` (or with the rest of
        ``batch_numbers``) reproduces the rest of the epoch exactly, whichever rank assembles a
        batch. With ``prefetch > 0`` a background thread assembles up to ``prefetch`` batches ahead
        (numpy releases the GIL in its kernels); its exceptions are re-raised here, and breaking out
        of the loop (or closing the generator) stops and joins it. ``pin_memory`` defaults to
        ``device`` being CUDA; pinned batches are moved with ``non_blocking=True``.
        """
        device = torch.device(device) if device is not None else None
        pin = (device is not None and device.type == "cuda") if pin_memory is None else pin_memory
        batches = self.epoch_batches(epoch)

        def make(batch_no: int) -> Batch:
            batch = self.assemble(batches[batch_no], mask_prob=mask_prob, mask_seed=(self.seed, epoch, batch_no))
            return batch.pin_memory() if pin else batch

        def deliver(batch: Batch) -> Batch:
            return batch.to(device, non_blocking=pin) if device is not None else batch

        if batch_numbers is None:
            numbers: Sequence[int] = range(max(start_batch, 0), len(batches))
        elif start_batch:
            raise ValueError("give start_batch or batch_numbers, not both")
        else:
            numbers = batch_numbers
            if len(numbers) and not 0 <= min(numbers) <= max(numbers) < len(batches):
                raise ValueError(f"batch_numbers {min(numbers)}..{max(numbers)} outside the epoch's "
                                 f"{len(batches)} batches")
        if prefetch <= 0:
            for batch_no in numbers:
                yield batch_no, deliver(make(batch_no))
            return

        ready: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for batch_no in numbers:
                    if stop.is_set() or not put((batch_no, make(batch_no))):
                        return
                put(done)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                put(exc)

        worker = threading.Thread(target=work, name=f"batches-{self.split}-{epoch}", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch_no, batch = item
                yield batch_no, deliver(batch)
        finally:
            stop.set()
            worker.join()
