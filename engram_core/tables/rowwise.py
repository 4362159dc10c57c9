"""Row-wise optimisers for embedding tables: state per row, only touched rows updated.

A table of R rows of width W read a few thousand rows a step wants an optimiser whose
cost follows the rows read, not R, and whose state is small. Two rules, after FBGEMM's
table-batched embedding optimisers:

    rowwise_adagrad   s_r += mean_j g_rj²                   (one float per row)
                      w_r -= lr · g_r / (√s_r + eps)
    rowwise_adam      m_r  = β1 m_r + (1-β1) g_r            (a vector per row)
                      v_r  = β2 v_r + (1-β2) mean_j g_rj²   (one float per row)
                      t_r += 1                              (steps this row was updated)
                      w_r -= lr · (m_r/(1-β1^t_r)) / (√(v_r/(1-β2^t_r)) + eps)

Both apply decoupled weight decay (w_r *= 1 - lr·wd) to the touched rows only. A row is
touched in a step when its gradient row is not all zero, whether the gradient is dense,
sparse (nn.Embedding(sparse=True)) or held in a device buffer (host placement): a dense
gradient cannot tell a read row with a zero gradient from an unread one, and one rule
for all three makes them give the same result. Rows not touched, and their state, are
left exactly as they were: the lazy semantics of torch.optim.SparseAdam, with a per-row
step count so each row's bias correction counts its own updates.

A parameter group with ``rowwise=False`` is updated element-wise over every row (plain
Adagrad, or AdamW with decoupled decay): one optimiser can then hold a model's tables and
its other parameters, which is what transformers' Trainer takes.

Where a table's update happens (`fused_backward`, per parameter of a ``rowwise=True`` group):

    "auto" (default)  in backward on CUDA in one process; elsewhere at `step()` as before
    True              in backward on any device
    False             at `step()`, from the gradient the table makes (dense unless sparse)

In backward, the optimiser marks the table's weight so a row table makes its gradient as
rows (`wants_row_gradients`: a sparse gradient of the rows read, never a dense
table-sized one), takes that gradient out of ``p.grad`` the moment it is accumulated
(`Tensor.register_post_accumulate_grad_hook`) and applies the rule. Nothing after the
backward (gradient clipping, a GradScaler, transformers' Trainer) sees a table gradient.
How many backwards make a step is learnt on the first step: that step's table gradients
are held (as rows) and applied at `step()`; with one backward per step every later
update happens inside the backward, with several (gradient accumulation) the rows of
every backward are summed and applied at `step()`. Either way the result is bit for bit
the update at `step()` of the same row gradients (and equals the dense path's to the
summation order of a row's reads). Element-wise groups (``rowwise=False``) are always
updated at `step()` (and clipped with everything else). Under torch.compile the table read
runs eagerly (a graph break: inductor cannot lower a sparse gradient). The newest
optimiser built over a parameter owns it; `release()` hands it back.
Under fp16 autocast (and so a GradScaler's loss scaling, which must unscale the table's
gradient and may skip the step) a table update in backward would see scaled gradients:
there the optimiser falls back to the dense path by itself, at the first read
(`reading_rows`).

Rows that are not a parameter's own data (a table in host memory whose forward reads a
prefetched device buffer, `engram_core.tables.host_rows`) are reached through a `RowHolder`
attached to the parameter: at `step()` the optimiser takes the step's working set from it
(the touched rows' values, their state and gradients, on the device), applies the rule,
and tells the holder, which stores rows and state back. Such parameters are updated at
`step()` also under `fused_backward`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch

ROW_HOLDER_ATTR = "engram_row_holder"
IN_BACKWARD_ATTR = "engram_updated_in_backward"  # the optimiser updating the parameter in backward (`_Owner`)
FUSED_BACKWARD_CHOICES = ("auto", True, False)


class RowHolder(Protocol):
    """Rows updated on behalf of a (placeholder) parameter: `attach_row_holder(param, holder)`.

    The holder keeps the rows and their optimiser state (and checkpoints both); for each
    step it hands the optimiser a working set: the touched rows' values and state, where
    the update is best computed (the device for host-held rows)."""

    embedding_dim: int  # W, the width of a row

    def take_update(self, specs: list[tuple[str, tuple[int, ...]]]):
        """None when no gradient arrived this step; else ``(values, state, index, grad, keep)``:
        `values` (n, W) and `state` {name: (n, *shape)} (one entry per `specs` item, a
        zero row where the row has none yet), the rows to update `index` (U,) into them,
        their summed gradients (U, W), and `keep` (U,) bool or None: rows to leave as they
        are where False (a zero gradient). Clears the step's gradients."""

    def rows_updated(self) -> None:
        """The working set of the last `take_update` was written: store it back."""


def attach_row_holder(param: torch.Tensor, holder: RowHolder) -> None:
    setattr(param, ROW_HOLDER_ATTR, holder)


def row_holder(param: torch.Tensor) -> RowHolder | None:
    return getattr(param, ROW_HOLDER_ATTR, None)


def in_backward_by_default(device: torch.device) -> bool:
    """What ``fused_backward="auto"`` means for a table on `device`: in backward on CUDA
    in one process. On the CPU the update stays at `step()` (published CPU results are
    reproduced bit for bit, and there a dense gradient costs little); on several ranks
    DDP reduces a replicated table's gradient after its accumulation, which an update in
    backward would pre-empt."""
    if device.type != "cuda":
        return False
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


class _Owner:
    """The optimiser that updates a parameter in backward, held weakly (a discarded one
    must not live on through its parameters); pickled (`torch.save(model)`) as no owner."""

    def __init__(self, optimizer=None):
        self._ref = weakref.ref(optimizer) if optimizer is not None else None

    def __call__(self):
        return self._ref() if self._ref is not None else None

    def __reduce__(self):
        return (_Owner, ())


def wants_row_gradients(weight: torch.Tensor) -> bool:
    """Whether a row table should make the gradient of `weight` as rows (sparse): a live
    row-wise optimiser updates it in backward. Row tables ask this at each forward."""
    owner = getattr(weight, IN_BACKWARD_ATTR, None)
    return owner is not None and owner() is not None


def reading_rows(weight: torch.Tensor) -> bool:
    """A row table reads rows of `weight` eagerly: whether this read makes row (sparse)
    gradients. Under fp16 autocast the optimiser that would update the table in backward
    gives it back (`release`): loss scaling must see the table's gradient, so the dense
    path, as before, runs there."""
    owner = getattr(weight, IN_BACKWARD_ATTR, None)
    opt = owner() if owner is not None else None
    if opt is None:
        return False
    device = weight.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16:
        opt.release()
        return False
    return True


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A (R, W) view of a parameter: a matrix as it is, a vector as R rows of one, a scalar as one."""
    if t.dim() == 0:
        return t.view(1, 1)
    if t.dim() == 1:
        return t.view(-1, 1)
    return t.view(t.shape[0], -1)


def touched(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(rows, summed gradient rows, keep) of a sparse or dense gradient: the rows to update
    and the whole gradient of each; `keep` None, or a bool per entry that is False where a
    row's summed gradient is all zero (left as it is, as the dense path leaves it)."""
    if grad.is_sparse:
        return summed_reads(grad)
    rows, g = nonzero_rows(as_rows(grad.contiguous()))
    return rows, g, None


def summed_reads(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sparse row gradient (one entry per read, rows repeated) summed per row without a
    host synchronisation: the N reads sorted by row, each run of equal rows summed into
    its segment (`index_add_`), and every read given its row's total. So the result has N
    entries, not one per distinct row (that count is data-dependent: `coalesce` and
    `nonzero` read it on the host, a stall in the middle of backward on a GPU); entries of
    one row carry the same gradient, so the update computes the same new values for each
    and the repeated `index_copy_` writes agree. The uncoalesced entries are read with
    `Tensor._indices()` / `_values()`, the methods torch's sparse documentation gives for
    uncoalesced tensors (`indices()` requires a coalesced one)."""
    rows = grad._indices()[0]
    values = grad._values()
    values = values.reshape(values.shape[0], -1)
    order = torch.argsort(rows)
    rows, values = rows.index_select(0, order), values.index_select(0, order)
    starts = torch.ones_like(rows, dtype=torch.bool)
    starts[1:] = rows[1:] != rows[:-1]
    segment = starts.cumsum(0) - 1
    sums = torch.zeros_like(values).index_add_(0, segment, values)
    g = sums.index_select(0, segment)
    return rows, g, g.ne(0).any(dim=1)


def _kept(new: torch.Tensor, old: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """`new` where `keep` (per entry), `old` elsewhere; `new` when keep is None."""
    if keep is None:
        return new
    return torch.where(keep.view(-1, *([1] * (new.dim() - 1))), new, old)


def nonzero_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, rows) of the rows of `grad` (N, W) that are not all zero."""
    rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)
    return rows, grad.index_select(0, rows)


class _Rowwise(torch.optim.Optimizer):
    rule = ""

    def __init__(self, params, defaults: dict, fused_backward: bool | str = "auto",
                 auto_policy: Callable[[torch.device], bool] | None = None):
        if fused_backward not in FUSED_BACKWARD_CHOICES or not isinstance(fused_backward, (bool, str)):
            raise ValueError(f"fused_backward must be 'auto', True or False, got {fused_backward!r}")
        super().__init__(params, defaults)
        self.fused_backward = fused_backward
        policy = auto_policy or in_backward_by_default
        self._in_backward: list[torch.Tensor] = []  # table parameters updated in backward
        self._pending: dict[int, torch.Tensor] = {}  # id(p) -> gradient rows held until step()
        self._backwards: dict[int, int] = {}  # id(p) -> backwards that reached p since the last step()
        # "learn" (the first step), then "backward" (one backward a step) or "accumulate"
        # (several: rows held until step())
        self._mode = "learn"
        for group in self.param_groups:
            for p in group["params"]:
                holder = row_holder(p)
                if holder is not None and hasattr(holder, "claim"):
                    holder.claim(self)  # the holder can tell a forward that nothing would train it
                if holder is not None or not group["rowwise"] or not p.requires_grad:
                    continue  # held rows are updated at step(); element-wise groups too
                if policy(p.device) if fused_backward == "auto" else fused_backward:
                    self._update_in_backward(p)

    def _update_in_backward(self, p: torch.Tensor) -> None:
        """Mark `p` (its table makes row gradients) and hook its gradient accumulation. The
        newest optimiser to mark a parameter owns it: an earlier one's hook does nothing."""
        setattr(p, IN_BACKWARD_ATTR, _Owner(self))
        self._in_backward.append(p)
        me = weakref.ref(self)  # the hook must not keep a discarded optimiser alive

        def hook(param: torch.Tensor) -> None:
            opt = me()
            if opt is not None and getattr(param, IN_BACKWARD_ATTR, lambda: None)() is opt:
                opt._take_gradient(param)

        p.register_post_accumulate_grad_hook(hook)

    @property
    def updates_in_backward(self) -> bool:
        """Whether some table of this optimiser is updated in backward."""
        return bool(self._in_backward)

    def release(self) -> None:
        """Stop updating this optimiser's tables in backward (it is being replaced, or fp16
        loss scaling runs): their tables make the gradients they made before, updated at
        `step()` (the dense path)."""
        for p in self._in_backward:
            ref = getattr(p, IN_BACKWARD_ATTR, None)
            if ref is not None and ref() is self:
                delattr(p, IN_BACKWARD_ATTR)
        self._in_backward = []

    # ---- state -------------------------------------------------------------------------

    def _state_of(self, p: torch.Tensor, rows_view: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            n, w = rows_view.shape
            for name, shape in self.state_specs(w, group["rowwise"]):
                state[name] = torch.zeros((n, *shape), dtype=torch.float32, device=rows_view.device)
        return state

    def state_specs(self, width: int, rowwise: bool) -> list[tuple[str, tuple[int, ...]]]:
        """(name, per-row shape) of each float32 state tensor the rule keeps."""
        raise NotImplementedError

    # ---- updates -----------------------------------------------------------------------

    def _group_of(self, p: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter not in this optimizer")

    def _take_gradient(self, p: torch.Tensor) -> None:
        """`p`'s gradient was just accumulated by a backward: apply it now (one backward a
        step) or hold it until `step()` (the first step, gradient accumulation)."""
        grad, p.grad = p.grad, None
        if grad is None:
            return
        key = id(p)
        seen = self._backwards.get(key, 0)
        self._backwards[key] = seen + 1
        if self._mode == "backward":
            if seen:
                raise RuntimeError(
                    "a row-wise table update in backward saw a second backward before optimizer.step(), after steps of one "
                    "backward each: keep the number of backwards per step fixed, or build the optimiser with fused_backward=False"
                )
            with torch.no_grad():
                self._update_param(p, grad, self._group_of(p))
            return
        held = self._pending.get(key)
        self._pending[key] = grad if held is None else held + grad  # rows + rows stay rows

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's, and the table gradients held for `step()` are dropped too."""
        super().zero_grad(set_to_none=set_to_none)
        self._pending.clear()
        self._backwards.clear()

    def _update_param(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        weight = as_rows(p.data)
        keep = None
        if group["rowwise"]:
            rows, g, keep = touched(grad)
        else:  # element-wise over every row: plain Adagrad / AdamW
            g = as_rows((grad.to_dense() if grad.is_sparse else grad).contiguous())
            rows = torch.arange(weight.shape[0], device=weight.device)
        self.update_rows(weight, self._state_of(p, weight, group), rows, g, group, keep)

    def _update_holder(self, p: torch.Tensor, holder: RowHolder) -> None:
        group = dict(self._group_of(p), rowwise=True)  # a holder's rows are always updated row-wise
        with torch.no_grad():
            got = holder.take_update(self.state_specs(holder.embedding_dim, True))
            if got is None:
                return
            values, state, index, grad, keep = got
            self.update_rows(values, state, index, grad, group, keep)
        holder.rows_updated()

    def update_rows(self, weight: torch.Tensor, state: dict, rows: torch.Tensor, grad: torch.Tensor, group: dict,
                    keep: torch.Tensor | None = None) -> None:
        """Apply the rule to `rows` of `weight` (R, W) with their summed gradients (U, W);
        `keep` (U,) bool or None: entries to leave as they are where False. `rows` may
        repeat a row only with the same gradient (`summed_reads`): its writes then agree."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                holder = row_holder(p)
                if holder is not None:
                    self._update_holder(p, holder)
                    continue
                held = self._pending.pop(id(p), None)
                grad = held if p.grad is None else (p.grad if held is None else held + p.grad)
                if grad is not None:
                    self._update_param(p, grad, group)
        self._learn_backwards_per_step()
        return loss

    def _learn_backwards_per_step(self) -> None:
        """After the first step that reached a table in backward: one backward each → update
        in backward from now on; more (gradient accumulation) → keep holding rows until step()."""
        counts = self._backwards.values()
        if self._mode == "learn" and counts:
            self._mode = "backward" if max(counts) == 1 else "accumulate"
        self._backwards = {}


def _decay(w: torch.Tensor, group: dict) -> torch.Tensor:
    return w.mul_(1.0 - group["lr"] * group["weight_decay"]) if group["weight_decay"] else w


class RowwiseAdagrad(_Rowwise):
    """Row-wise Adagrad (one accumulator per row; FBGEMM's EXACT_ROWWISE_ADAGRAD rule)."""

    rule = "rowwise_adagrad"

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-8, weight_decay: float = 0.0, rowwise: bool = True,
                 fused_backward: bool | str = "auto", auto_policy: Callable[[torch.device], bool] | None = None):
        _check(lr, eps, weight_decay)
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, rowwise=rowwise), fused_backward, auto_policy)

    def state_specs(self, width, rowwise):
        return [("sum", () if rowwise else (width,))]

    def update_rows(self, weight, state, rows, grad, group, keep=None):
        if rows.numel() == 0:
            return
        g = grad.float()
        gsq = g.square().mean(dim=1) if group["rowwise"] else g.square()
        s_old = state["sum"].index_select(0, rows)
        s = s_old + gsq
        state["sum"].index_copy_(0, rows, _kept(s, s_old, keep))
        denom = s.sqrt().add_(group["eps"])
        if group["rowwise"]:
            denom = denom.unsqueeze(1)
        w_old = weight.index_select(0, rows)
        w = _decay(w_old.to(torch.float32, copy=True), group)  # a copy: w_old stays for `keep`
        w.addcdiv_(g, denom, value=-group["lr"])
        weight.index_copy_(0, rows, _kept(w.to(weight.dtype), w_old, keep))


class RowwiseAdam(_Rowwise):
    """Row-wise Adam: first moment per element, second moment per row, bias correction
    per row (FBGEMM's PARTIAL_ROWWISE_ADAM rule, with decoupled weight decay)."""

    rule = "rowwise_adam"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rowwise: bool = True,
        fused_backward: bool | str = "auto",
        auto_policy: Callable[[torch.device], bool] | None = None,
    ):
        _check(lr, eps, weight_decay)
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rowwise=rowwise), fused_backward, auto_policy)

    def state_specs(self, width, rowwise):
        return [("step", ()), ("exp_avg", (width,)), ("exp_avg_sq", () if rowwise else (width,))]

    def update_rows(self, weight, state, rows, grad, group, keep=None):
        if rows.numel() == 0:
            return
        b1, b2 = group["betas"]
        g = grad.float()
        t_old = state["step"].index_select(0, rows)
        t = t_old + 1.0
        state["step"].index_copy_(0, rows, _kept(t, t_old, keep))
        m_old = state["exp_avg"].index_select(0, rows)
        m = (m_old * b1).add_(g, alpha=1.0 - b1)
        state["exp_avg"].index_copy_(0, rows, _kept(m, m_old, keep))
        gsq = g.square().mean(dim=1) if group["rowwise"] else g.square()
        v_old = state["exp_avg_sq"].index_select(0, rows)
        v = (v_old * b2).add_(gsq, alpha=1.0 - b2)
        state["exp_avg_sq"].index_copy_(0, rows, _kept(v, v_old, keep))
        t64 = t.double()  # 1 - β^t in float32 loses ~1e-5 of itself (β = 0.999, t = 1)
        bias1 = (1.0 - b1**t64).float()
        bias2 = (1.0 - b2**t64).float()
        if group["rowwise"]:
            denom = (v / bias2).sqrt_().add_(group["eps"]).unsqueeze(1)
        else:
            denom = (v / bias2.unsqueeze(1)).sqrt_().add_(group["eps"])
        w_old = weight.index_select(0, rows)
        w = _decay(w_old.to(torch.float32, copy=True), group)  # a copy: w_old stays for `keep`
        w.sub_(group["lr"] * (m / bias1.unsqueeze(1)) / denom)
        weight.index_copy_(0, rows, _kept(w.to(weight.dtype), w_old, keep))


def _check(lr: float, eps: float, weight_decay: float) -> None:
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


ROWWISE_OPTIMIZERS: dict[str, Any] = {"rowwise_adagrad": RowwiseAdagrad, "rowwise_adam": RowwiseAdam}
