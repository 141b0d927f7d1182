"""The paged pool: many sequences of very different lengths in one set of
pages (contract: docs/serving.md).

  pool = kvjax.paged.init(kvjax.PagedSpec(num_kv_heads=8, head_dim=128))
  pool = kvjax.paged.append(pool, seq, k, v, n_valid)   # ragged, in jit
  out = kvjax.paged.attend(pool, seq, q)                # [B, n_q, Hq, D]
  pool = kvjax.paged.fork(pool, src, dst)               # shares full pages
  pool = kvjax.paged.free(pool, seq)
  kvjax.paged.check(pool); kvjax.paged.stats(pool)     # refusals, accounting
  pool = kvjax.paged.acknowledge(pool, seq)            # refusals handled
"""

from kvjax._pool import PagedCache
from kvjax._pool import acknowledge
from kvjax._pool import append
from kvjax._pool import fork
from kvjax._pool import free
from kvjax._pool import init
from kvjax._pool_attention import attend
from kvjax._pool_views import check
from kvjax._pool_views import materialize
from kvjax._pool_views import stats
from kvjax._prefix import PrefixIndex
from kvjax._prefix import PrefixMatch
from kvjax._spec import PagedSpec

__all__ = ("PagedCache", "PagedSpec", "PrefixIndex", "PrefixMatch", "acknowledge", "append", "attend", "check", "fork", "free",
           "init", "materialize", "stats")
