// ParallelFor over XLA's intra-op thread pool, shared by the handlers.
#ifndef KVJAX_FFI_PARALLEL_FOR_H_
#define KVJAX_FFI_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace kvjax {

// Runs fn(begin, end) over [0, n) in chunks on the calling thread and XLA's
// pool. Workers claim chunks from a shared counter and the caller waits only
// for chunks already claimed, so it never waits on a task still queued behind
// busy pool threads (no deadlock when the caller is itself a pool thread).
// `max_chunks` (default 4 per pool thread) bounds how finely the range is
// split; `pool_tasks` (default one per pool thread) how many pool threads
// join the caller.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t min_chunk, Fn fn,
                 int64_t max_chunks = -1, int64_t pool_tasks = -1) {
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  if (max_chunks < 0) max_chunks = 4 * workers;
  if (pool_tasks < 0) pool_tasks = workers;
  const int64_t chunks = std::min<int64_t>(max_chunks, n / std::max<int64_t>(1, min_chunk));
  if (chunks <= 1) {
    fn(0, n);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto shared = std::make_shared<Shared>();
  const int64_t size = (n + chunks - 1) / chunks;
  // Pool tasks reach `fn` through this pointer and call it only for a claimed
  // chunk, which keeps the caller (and so `fn`) waiting until it is done.
  const Fn* body = &fn;
  auto work = [shared, body, chunks, size, n] {
    for (int64_t c; (c = shared->next.fetch_add(1)) < chunks;) {
      const int64_t begin = std::min(n, c * size);
      if (begin < n) (*body)(begin, std::min(n, begin + size));
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 0; t < std::min(pool_tasks, chunks - 1); ++t) {
    pool.Schedule([work] { work(); });
  }
  work();
  while (shared->done.load(std::memory_order_acquire) < chunks) {
    std::this_thread::yield();
  }
}

}  // namespace kvjax

#endif  // KVJAX_FFI_PARALLEL_FOR_H_
