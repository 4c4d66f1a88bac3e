"""Let ``import fairseq`` work on a node without scikit-learn and scipy (installed by the offline bundle's node.sh).

Why: ``import fairseq`` imports every task and criterion module, and two of them import scikit-learn / scipy at
module level (``fairseq/tasks/audio_classification.py``; ``fairseq/criterions/sentence_prediction.py``, and through
it ``sentence_prediction_adapters.py``). Their wheels are ~45 MB (scipy 35.2 MB, scikit-learn 9.2 MB, plus joblib and
threadpoolctl) against a 60 MB budget for the whole bundle, of which fairseq-fixed alone takes 20.5 MB; and the S2T
path (speech_to_text data, this plugin's task, models and criterion, fairseq-generate) never runs that code.

What: a meta-path finder wraps the loaders of ``fairseq.tasks.*`` and ``fairseq.criterions.*`` modules only. When
executing one of them fails because scikit-learn or scipy is missing (or because it imports from a module that was
disabled that way), the module is left as a placeholder that registers nothing, so fairseq offers no such task or
criterion (``--task audio_classification`` is refused by fairseq's own "invalid choice"), and any use of its names
raises :class:`OptionalDependencyMissing` saying what to install. Nothing else changes: other imports of sklearn or
scipy still fail as usual (no fake packages), and with both installed the wrapper never intervenes.
"""

import importlib.abc
import importlib.machinery
import sys

OPTIONAL = ("sklearn", "scipy")
PACKAGES = ("fairseq.tasks", "fairseq.criterions")
HINT = ("needs scikit-learn and scipy, which the offline bundle leaves out (S2T never uses them); "
        "install them (pip install scikit-learn scipy) or build the bundle with WITH_SKLEARN=1")


class OptionalDependencyMissing(ImportError):
    pass


def _placeholder(module, missing: str) -> None:
    name = module.__name__
    keep = {k: module.__dict__[k] for k in ("__name__", "__spec__", "__loader__", "__file__", "__package__",
                                            "__path__") if k in module.__dict__}
    module.__dict__.clear()
    module.__dict__.update(keep)
    module.__doc__ = f"placeholder: {name} {HINT} (missing: {missing})"
    module.__smoe_disabled__ = missing

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise OptionalDependencyMissing(f"{name}.{attr}: {name} {HINT} (missing: {missing})")

    module.__getattr__ = __getattr__


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        try:
            self.inner.exec_module(module)
        except OptionalDependencyMissing as e:
            _placeholder(module, str(e).rsplit("(missing: ", 1)[-1].rstrip(")"))
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in OPTIONAL:
                raise
            _placeholder(module, e.name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        parent, _, _ = fullname.rpartition(".")
        if parent not in PACKAGES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or spec.submodule_search_locations is not None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Idempotent; called from the ``.pth`` file node.sh writes into the node's virtual environment."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def disabled() -> dict:
    """``{module: missing package}`` for the fairseq modules left as placeholders (for the summary)."""
    return {n: getattr(m, "__dict__", {})["__smoe_disabled__"] for n, m in list(sys.modules.items())
            if "__smoe_disabled__" in getattr(m, "__dict__", {})}
