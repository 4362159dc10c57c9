"""Large tables as a plugin of engram-core's own: row-table placements, the row-wise
optimisers, and the engine hooks through which the engine reaches tables whose rows live
outside their parameter (host memory) or are split over ranks (`engram_core.hookspecs`,
"engine hooks"). The kernel imports nothing from this package; engram-core's entry point
`engram-tables` registers it. Each hook imports the table code only when a table exists.
"""

from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def engram_placements(register):
    def device(num_rows, dim, sparse=False):
        from .device_rows import DeviceRowTable

        return DeviceRowTable(num_rows, dim, sparse=sparse)

    def host(num_rows, dim, sparse=False):
        from .host_rows import host_row_table

        return host_row_table(num_rows, dim, sparse=sparse)

    def sharded(num_rows, dim, sparse=False):
        from .sharded_rows import ShardedEmbedding

        return ShardedEmbedding(num_rows, dim, sparse=sparse)

    register("device", device, help="an nn.Embedding on the model's device")
    register("host", host, help="rows in pinned host memory, gathered ahead of the forward; a row-wise optimiser trains them")
    register("sharded", sharded, help="rows split over the ranks of a torchrun run, looked up with all-to-all")


@hookimpl
def engram_optimizers(register):
    # fused_backward "auto": on CUDA in one process the tables make row (sparse) gradients and
    # are updated inside the backward (several micro-batches: their rows summed, applied at
    # step()); on the CPU at step() as before (engram_core.tables.rowwise)
    def rowwise_adagrad(groups, st):
        from .rowwise import RowwiseAdagrad

        return RowwiseAdagrad(groups, lr=st.lr, fused_backward="auto")

    def rowwise_adam(groups, st):
        from .rowwise import RowwiseAdam

        return RowwiseAdam(groups, lr=st.lr, betas=st.betas, fused_backward="auto")

    register("rowwise_adagrad", rowwise_adagrad, help="row-wise Adagrad: one accumulator per row, touched rows only", holds_rows=True)
    register("rowwise_adam", rowwise_adam, help="row-wise Adam: per-row second moment and step count, touched rows only", holds_rows=True)


# ---- engine hooks ------------------------------------------------------------------------------


@hookimpl
def engram_held_rows(model):
    from .rowwise import row_holder

    return [(n, row_holder(p)) for n, p in model.named_parameters() if row_holder(p) is not None]


@hookimpl
def engram_grad_clipper(model):
    import functools

    from .sharded_rows import clip_grad_norm_, sharded_tables

    if not sharded_tables(model):
        return None
    return functools.partial(clip_grad_norm_, model=model)


@hookimpl
def engram_serve_peers():
    from .sharded_rows import serve_peers

    return serve_peers()


@hookimpl
def engram_save_extras(run_dir, tag, model, optimizers, optimizer_states):
    from . import state
    from .sharded_rows import sharded_tables

    if not sharded_tables(model):
        return None
    optimizer_states[:] = state.strip_rows(optimizer_states, optimizers, model)
    return {"sharded_tables": state.save(run_dir, tag, model, optimizers)}


@hookimpl
def engram_load_extras(run_dir, state, model, optimizers):
    from . import state as sharded_state

    if optimizers is None:
        sharded_state.load_model(run_dir, state.get("sharded_tables"), model)
    else:
        sharded_state.load_optimizers(run_dir, state.get("sharded_tables"), optimizers, model)


@hookimpl
def engram_prune_extras(run_dir, state):
    from . import state as sharded_state

    tables = state.get("sharded_tables")
    sharded_state.prune(run_dir, tables["folder"] if tables else None)


@hookimpl
def engram_extra_state_keys(state):
    return {f"{n}.weight" for n in (state.get("sharded_tables") or {}).get("tables", ())}

