"""moe_routing: Mixture-of-Experts token routing as PyTorch custom operators."""
import torch  # noqa: F401  (loads libtorch before our library)

try:
    from . import _C  # noqa: F401  (registers torch.ops.moe_routing.*)
except ImportError as error:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "moe_routing: the compiled extension moe_routing._C failed to load "
        f"({error}). Build it first: `make install` (or `pip install --no-build-isolation -e .`)"
        " against the torch you run with."
    ) from error

from .ops import (  # noqa: E402
    ExpertChoice,
    Plan,
    Routing,
    balanced_assignment,
    capacity,
    combine,
    dispatch,
    expert_choice,
    expert_choice_slots,
    grouped_mm,
    load_balancing_loss,
    plan,
    route,
    swiglu,
    z_loss,
)
from .layers import (  # noqa: E402
    MoE, Experts, Router, RouterOutput, aux_loss, expert_load, routing_stats, update_bias,
)
from . import reference  # noqa: E402,F401


def __getattr__(name: str):
    """`moe_routing.hf` and `moe_routing.parallel` after a plain `import
    moe_routing`, loaded on first use (hf imports torch._dynamo: about 1 s)."""
    if name in ("hf", "parallel"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ExpertChoice", "Plan", "Routing", "balanced_assignment", "capacity", "combine", "dispatch",
    "expert_choice",
    "expert_choice_slots", "grouped_mm", "load_balancing_loss", "plan", "route", "swiglu", "z_loss",
    "MoE", "Experts", "Router", "RouterOutput", "aux_loss", "expert_load", "routing_stats",
    "update_bias",
]
