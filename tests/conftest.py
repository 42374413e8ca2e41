import os

# The Triton kernels run on CPU tensors under Triton's interpreter; it must be chosen before triton
# is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch._functorch.config  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
# CI draws the same 60 examples a property on every run (derandomize): a red CI run then means a change
# broke something, and any run reproduces it. New examples are explored by the thorough profile, random.
settings.register_profile("ci", max_examples=60, derandomize=True, **_common)
# The acceptance bar of the core issue: `HYPOTHESIS_PROFILE=thorough pytest` runs 300 examples a property.
settings.register_profile("thorough", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# torch's AOTAutograd cache keys a compiled step by its forward graph only, so after a change to a custom
# op's backward a warm cache replays the old one (pytorch/pytorch#144344): the tests compile afresh.
if hasattr(torch._functorch.config, "enable_autograd_cache"):
    torch._functorch.config.enable_autograd_cache = False
# Inductor's FX graph cache likewise replayed code compiled against a custom op's earlier fake (its strides)
os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"


# The half-precision gradient bounds (helpers.dot_product_allowance) assume GEMMs that accumulate in float32 and
# round once; cuBLAS may also reduce split-K partial sums in half precision unless told not to.
if torch.cuda.is_available():
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
