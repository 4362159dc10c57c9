"""The one registry, filled by plugins through the pluggy hooks of `engram_core.hookspecs`.

It holds the five kinds of component (`Component`, looked up by short or qualified name)
and the extensions (`Extension`: optimisers, experiment loggers, row-table placements and
`engram` subcommands). Loading is per entry point and every hook of a plugin is called
once, when it loads, so one broken plugin is reported (with its error) and every other
plugin still works. ``ENGRAM_PLUGINS`` (comma-separated entry-point
names; empty means none) limits which third-party plugins load, so tests can run
hermetically; the core's own components always load.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from importlib import metadata
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .errors import MalformedRegistration, PluginError, RecipeError, did_you_mean

ENTRY_POINT_GROUP = "engram"
CORE = "core"

KIND_SINGULAR = {
    "datasets": "data set",
    "heads": "head",
    "memories": "memory",
    "objectives": "objective",
    "metrics": "metric",
    "optimizers": "optimizer",
    "loggers": "logger",
    "placements": "placement",
    "commands": "command",
}
# what `engram describe KIND NAME` and completion accept for each kind
KIND_ALIASES = {
    "dataset": "datasets", "datasets": "datasets", "data": "datasets",
    "head": "heads", "heads": "heads",
    "memory": "memories", "memories": "memories",
    "objective": "objectives", "objectives": "objectives",
    "metric": "metrics", "metrics": "metrics",
}
# the keyword arguments each extension kind's `register` takes, beside name and factory
EXTENSION_OPTIONS = {
    "optimizers": ("help", "holds_rows", "implementations"),
    "loggers": ("help", "modules", "install"),
    "placements": ("help",),
    "commands": ("help",),
}


@attrs.frozen
class Component:
    kind: str
    name: str
    plugin: str
    factory: Callable[..., Any]
    config_cls: type
    provides: tuple[str, ...] = ()  # capabilities: what objectives, metrics and memories may require
    requires: tuple[str, ...] = ()
    points: tuple[str, ...] = ()  # attachment points: a head's it offers, a memory's it attaches at

    @property
    def offers(self) -> tuple[str, ...]:
        """A head's attachment points (the earlier name of `points` for heads)."""
        return self.points

    @property
    def qualified(self) -> str:
        return f"{self.plugin}:{self.name}"

    @property
    def doc(self) -> str:
        import inspect

        return inspect.getdoc(self.factory) or ""


@attrs.frozen
class Extension:
    """An optimiser, experiment logger, row-table placement or `engram` subcommand.

    optimizers  factory(param_groups, stage) -> torch.optim.Optimizer; `holds_rows`: it can train
                tables whose rows live outside their parameter (engram_core.tables.rowwise);
                `implementations`: the values of `stages.N.optimizer_impl` besides 'auto' it honours
    loggers     factory(LoggerContext) -> Logger; `modules` are checked before a run starts and a
                missing one is a one-line error telling the user to `pip install` `install`
    placements  factory(num_rows, dim, sparse=False) -> a row table (engram_core.tables.row_tables)
    commands    factory(argparse parser) -> handler(args, console) -> exit status
    """

    kind: str
    name: str
    plugin: str
    factory: Callable[..., Any]
    help: str = ""
    holds_rows: bool = False
    implementations: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    install: str = ""


@attrs.define
class PluginInfo:
    name: str
    module: str
    dist: str | None = None
    version: str | None = None
    error: str | None = None  # one line; the plugin is broken when set
    detail: str | None = None  # the traceback, for --verbose
    components: list[str] = attrs.field(factory=list)

    @property
    def broken(self) -> bool:
        return self.error is not None


class Registry:
    """All registered components, by kind, plus what happened to each plugin."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, Component]] = {k: {} for k in hookspecs.KINDS}
        self.extensions: dict[str, dict[str, Extension]] = {k: {} for k in EXTENSION_OPTIONS}
        self.plugins: dict[str, PluginInfo] = {}
        self.filtered: dict[str, Any] = {}  # installed entry points that ENGRAM_PLUGINS left out
        self.enabled: str | None = None  # ENGRAM_PLUGINS when it was loaded (load_registry)
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)

    # -- loading ------------------------------------------------------------------

    def add_plugin(self, name: str, module: Any, info: PluginInfo, kinds: tuple[str, ...] | None = None) -> None:
        """Register one plugin module and call its hooks (only those of `kinds`, e.g.
        ("commands",), where given: `engram --help` builds no component); failures mark it broken."""
        self.plugins[name] = info
        try:
            self.pm.register(module, name=name)
        except Exception as exc:  # pluggy raises on bad hookimpl signatures
            info.error = f"cannot register: {exc}"
            return
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            info.error = f"unknown hook implementation: {exc} (hooks: {', '.join('engram_' + k for k in KIND_SINGULAR)})"
            return
        staged: list[Component] = []
        extensions: list[Extension] = []
        try:
            for kind in KIND_SINGULAR:
                if kinds is not None and kind not in kinds:
                    continue
                caller = getattr(self.pm.hook, f"engram_{kind}")
                for impl in caller.get_hookimpls():
                    if impl.plugin_name != name:
                        continue
                    if kind in EXTENSION_OPTIONS:
                        impl.function(register=self._extension_registrar(kind, name, extensions))
                    else:
                        impl.function(register=self._registrar(kind, name, staged))
        except MalformedRegistration as exc:  # this plugin is broken; every other one still loads
            self.pm.unregister(name=name)
            info.error = str(exc)
            info.detail = traceback.format_exc()
            return
        except PluginError as exc:
            self.pm.unregister(name=name)
            raise exc
        except Exception as exc:
            self.pm.unregister(name=name)
            info.error = f"{type(exc).__name__}: {exc}"
            info.detail = traceback.format_exc()
            return
        for comp in staged:
            self.components[comp.kind][comp.qualified] = comp
            info.components.append(f"{KIND_SINGULAR[comp.kind]} {comp.name}")
        for ext in extensions:
            self.extensions[ext.kind][ext.name] = ext
            info.components.append(f"{KIND_SINGULAR[ext.kind]} {ext.name}")

    def _extension_registrar(self, kind: str, plugin: str, staged: list[Extension]):
        allowed = EXTENSION_OPTIONS[kind]

        def register(name, factory, **options):
            what = f"plugin {plugin}: {KIND_SINGULAR[kind]} {name!r}"
            if not isinstance(name, str) or not name or ":" in name:
                raise MalformedRegistration(f"{what}: the name must be a non-empty string without ':'")
            if not callable(factory):
                raise MalformedRegistration(f"{what}: factory must be callable, got {factory!r}")
            unknown = sorted(set(options) - set(allowed))
            if unknown:
                raise MalformedRegistration(f"{what}: unknown keyword {unknown[0]!r}; {kind} take {', '.join(allowed)}")
            if "modules" in options:
                options["modules"] = tuple(options["modules"])
            clash = self.extensions[kind].get(name) or next((e for e in staged if e.kind == kind and e.name == name), None)
            if clash is not None:
                raise PluginError(f"{KIND_SINGULAR[kind]} '{name}' is registered twice: by {clash.plugin} and by {plugin}")
            staged.append(Extension(kind, name, plugin, factory, **options))

        return register

    def _registrar(self, kind: str, plugin: str, staged: list[Component]):
        def register(name, factory, config_cls, *, provides=(), requires=(), points=(), offers=()):
            what = f"plugin {plugin}: {KIND_SINGULAR[kind]} {name!r}"
            if not isinstance(name, str) or not name or ":" in name:
                raise MalformedRegistration(f"{what}: the name must be a non-empty string without ':'")
            if not isinstance(config_cls, type) or not attrs.has(config_cls):
                raise MalformedRegistration(f"{what}: config class must be an attrs class, got {config_cls!r}")
            if not callable(factory):
                raise MalformedRegistration(f"{what}: factory must be callable, got {factory!r}")
            for label, caps in (("provides", provides), ("requires", requires), ("points", points), ("offers", offers)):
                if isinstance(caps, str) or not all(isinstance(c, str) for c in caps):
                    raise MalformedRegistration(f"{what}: {label} must be a tuple of strings, got {caps!r}")
            provides, points = _points_of(kind, what, tuple(provides), tuple(points), tuple(offers))
            comp = Component(kind, name, plugin, factory, config_cls, provides, tuple(requires), points)
            if kind == "memories":
                # a memory that says it fits a point must implement that point's protocol;
                # the plugin is then listed as broken (with why) and the others still load
                from .points import check_memory_implements

                problems = check_memory_implements(factory, comp.points)
                if problems:
                    raise TypeError(f"memory '{name}' ({getattr(factory, '__qualname__', factory)}) " + "; ".join(problems))
            clash = self.components[kind].get(comp.qualified) or next(
                (c for c in staged if c.kind == kind and c.qualified == comp.qualified), None
            )
            if clash is not None:
                a = _dist_of(clash.factory)
                b = _dist_of(factory)
                raise PluginError(
                    f"{KIND_SINGULAR[kind]} '{comp.qualified}' is registered twice: by {a} and by {b}"
                )
            staged.append(comp)

        return register

    # -- lookup -------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def resolve(self, kind: str, name: str, path: str) -> Component:
        """Find a component by short or qualified name; errors carry the recipe path."""
        table = self.components[kind]
        what = KIND_SINGULAR[kind]
        if ":" in name:
            if name in table:
                return table[name]
            plugin = name.split(":", 1)[0]
            info = self.plugins.get(plugin)
            if info is not None and info.broken:
                raise RecipeError([(path, f"{what} '{name}' comes from plugin '{plugin}', which is broken: {info.error}")])
            where = self.provider_hint(kind, name)
            if where:
                raise RecipeError([(path, f"unknown {what} '{name}': {where}")])
            raise RecipeError([(path, f"unknown {what} '{name}'{did_you_mean(name, table)}; known: {', '.join(sorted(table)) or 'none'}")])
        matches = [c for c in table.values() if c.name == name]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            both = " or ".join(f"'{c.qualified}'" for c in sorted(matches, key=lambda c: c.qualified))
            raise RecipeError([(path, f"{what} '{name}' is ambiguous: write {both}")])
        broken = [p for p in self.plugins.values() if p.broken]
        short = sorted({c.name for c in table.values()})
        where = self.provider_hint(kind, name)
        if where:
            raise RecipeError([(path, f"unknown {what} '{name}': {where}")])
        hint = did_you_mean(name, short)
        msg = (f"unknown {what} '{name}'{hint}; known: {', '.join(short) or 'none'} "
               "(a component of a plugin that is not installed is unknown here: `engram plugins` lists what is)")
        if broken:
            msg += "; broken plugins that may provide it: " + ", ".join(f"{p.name} ({p.error})" for p in broken)
        raise RecipeError([(path, msg)])

    def _filtered_registries(self) -> dict[str, Registry]:
        """Each filtered plugin loaded aside (only on an error path), to ask what it provides."""
        if not hasattr(self, "_side"):
            self._side: dict[str, Registry] = {}
            for ep_name, ep in sorted(self.filtered.items()):
                try:
                    side = Registry()
                    side.add_plugin(ep_name, ep.load(), PluginInfo(ep_name, ep.value))
                except Exception:
                    continue
                self._side[ep_name] = side
        return self._side

    def provider_hint(self, kind: str, name: str) -> str:
        """Where a component that is not loaded comes from: a plugin ENGRAM_PLUGINS filtered out,
        or, for a qualified name (`plugin:name`), a plugin no installed entry point provides."""
        short = name.split(":", 1)[-1]
        for ep_name, side in self._filtered_registries().items():
            if any(c.name == short for c in side.components[kind].values()):
                enabled = os.environ.get("ENGRAM_PLUGINS", "")
                return (f"it comes from plugin '{ep_name}', which is installed but not enabled "
                        f"(ENGRAM_PLUGINS={enabled!r}); add {ep_name} to ENGRAM_PLUGINS, or unset it to load every plugin")
        plugin = name.split(":", 1)[0] if ":" in name else None
        if plugin is not None and plugin not in self.plugins and plugin not in self.filtered:
            folder = checkout_folder_of(plugin)
            how = f"pip install -e {folder}" if folder else f"install the package that declares the entry point '{plugin}'"
            return (f"it comes from plugin '{plugin}', which is not installed (no entry point '{plugin}' in the group "
                    f"'{ENTRY_POINT_GROUP}'): {how}")
        return ""


def checkout_folder_of(plugin: str) -> str | None:
    """In an engram checkout, the package folder (relative, e.g. `plugins/fla-ref`) whose
    pyproject.toml declares the entry point `plugin` in the engram group; None elsewhere (an
    installed engram_core has no plugin folders beside it). Read from the folders' own
    pyproject files, so the core keeps no list of plugins."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for pyproject in sorted([*root.glob("plugins/*/pyproject.toml"), *root.glob("examples/*/pyproject.toml")]):
        try:
            declared = tomllib.loads(pyproject.read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if plugin in declared:
            return pyproject.parent.relative_to(root).as_posix()
    return None


def _points_of(kind: str, what: str, provides: tuple, points: tuple, offers: tuple) -> tuple[tuple, tuple]:
    """(capabilities, attachment points) of a registration. Earlier registrations said a head's
    points with `offers` and a memory's with `provides` (which then also counted as its
    capabilities): both still work for one release, with a DeprecationWarning."""
    import warnings

    if points and kind not in ("heads", "memories"):
        raise MalformedRegistration(f"{what}: only heads and memories have attachment points (points=)")
    if offers:
        if kind != "heads":
            raise MalformedRegistration(f"{what}: offers= is a head's attachment points; say points=")
        warnings.warn(f"{what}: offers= is now points= (offers goes after the next release)", DeprecationWarning, stacklevel=3)
        points = tuple(dict.fromkeys(points + offers))
    if kind == "memories" and provides and not points:
        warnings.warn(f"{what}: say the points it attaches at with points={provides!r}; provides= now names "
                      "capabilities only (read as both for one more release)", DeprecationWarning, stacklevel=3)
        points = provides
    return provides, points


def _dist_of(obj: Any) -> str:
    mod = getattr(obj, "__module__", "?") or "?"
    top = mod.split(".")[0]
    try:
        dists = metadata.packages_distributions().get(top)
    except Exception:
        dists = None
    return f"{dists[0]} ({mod})" if dists else mod


def _enabled_filter() -> set[str] | None:
    raw = os.environ.get("ENGRAM_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def is_core_entry_point(ep) -> bool:
    """An entry point of engram-core's own distribution (its tools): always loaded, like the core."""
    return ep.dist is not None and ep.dist.name.replace("_", "-").lower() == "engram-core"


_cached: Registry | None = None


def load_registry(refresh: bool = False, extra: dict[str, Any] | None = None) -> Registry:
    """The registry with the core and every installed plugin (cached per process).

    `extra` maps names to plugin modules registered in addition (tests use it).
    """
    global _cached
    if _cached is not None and not refresh and extra is None and _cached.enabled == os.environ.get("ENGRAM_PLUGINS"):
        return _cached
    reg = Registry()
    reg.enabled = os.environ.get("ENGRAM_PLUGINS")  # the filter it was loaded under: a cache for another is stale
    from . import __version__
    from .builtin import plugin as core_plugin

    reg.add_plugin(CORE, core_plugin, PluginInfo(CORE, core_plugin.__name__, "engram-core", __version__))
    wanted = _enabled_filter()
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name == CORE:
            continue
        if wanted is not None and ep.name not in wanted and not is_core_entry_point(ep):
            reg.filtered[ep.name] = ep
            continue
        dist = ep.dist.name if ep.dist else None
        version = ep.dist.version if ep.dist else None
        if ep.name in reg.plugins:
            if reg.plugins[ep.name].dist == dist:  # one distribution seen twice on sys.path
                continue
            raise PluginError(
                f"plugin name '{ep.name}' is registered twice: by {reg.plugins[ep.name].dist} and by {dist}"
            )
        info = PluginInfo(ep.name, ep.value, dist, version)
        try:
            module = ep.load()
        except Exception as exc:
            info.error = f"import failed: {type(exc).__name__}: {exc}"
            info.detail = traceback.format_exc()
            reg.plugins[ep.name] = info
            continue
        reg.add_plugin(ep.name, module, info)
    for name, module in (extra or {}).items():
        reg.add_plugin(name, module, PluginInfo(name, getattr(module, "__name__", str(module))))
    if extra is None:
        _cached = reg
    return reg
