"""kvjax: a functional, quantized KV cache for JAX decoding loops."""

from kvjax._affine import AffineCodes
from kvjax._affine import Q4Codes
from kvjax._affine import Q8Codes
from kvjax._attention import attend
from kvjax._backend import backend_info
from kvjax._formats import RawValues
from kvjax._io import CacheFileError
from kvjax._io import file_metadata
from kvjax._io import load
from kvjax._io import save
from kvjax._layers import ModelCache
from kvjax._layers import init_layers
from kvjax._layers import layer_runs
from kvjax._layers import length
from kvjax._ops import dequantize
from kvjax._ops import quantize
from kvjax._sharding import cache_sharding
from kvjax._sharding import shard
from kvjax._spec import CacheSpec
from kvjax._spec import PagedSpec
from kvjax._state import KVCache
from kvjax._state import init
from kvjax._transforms import acknowledge_overflow
from kvjax._transforms import append
from kvjax._transforms import check
from kvjax._transforms import clear
from kvjax._transforms import evict
from kvjax._transforms import migrate
from kvjax._turbo import TurboCodes
from kvjax._views import materialize
from kvjax._views import stats

from kvjax import paged  # noqa: E402  (the module, kvjax.paged)

__version__ = "0.1.0"

__all__ = (
    "AffineCodes",
    "CacheFileError",
    "CacheSpec",
    "KVCache",
    "ModelCache",
    "PagedSpec",
    "Q4Codes",
    "Q8Codes",
    "RawValues",
    "TurboCodes",
    "acknowledge_overflow",
    "append",
    "attend",
    "backend_info",
    "cache_sharding",
    "check",
    "clear",
    "dequantize",
    "evict",
    "file_metadata",
    "init",
    "init_layers",
    "layer_runs",
    "length",
    "load",
    "materialize",
    "migrate",
    "quantize",
    "save",
    "shard",
    "stats",
)
