// The XLA FFI handler of decode attention: reads the cache's own buffers in
// place (any leading batch axes from vmap, size 1 where unbatched; a layer
// axis, size 1 for a single cache), checks them, and hands an AttendProblem
// to the driver with the selected variant's AttendRun.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "attention_driver.h"
#include "kernels.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"
#include "xla_handlers.h"

namespace ffi = xla::ffi;

namespace kvjax {
namespace {

std::string Shape(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// An operand with `core` trailing dims after the call's batch dims: for each
// flattened batch index, its offset in elements (0 along axes of size 1).
// With `no_layers`, the first core dim (the layer axis of a stack) is absent
// and reads as 1: a single cache is passed as it is, since reshaping a loop-
// carried buffer to add the axis makes XLA copy it on every step.
class Batched {
 public:
  Batched(const char* name, ffi::Span<const int64_t> dims, int core,
          const std::vector<int64_t>& batch, std::string* error, bool no_layers = false,
          bool unbatched = false)
      : name_(name), dims_(dims.begin(), dims.end()) {
    const size_t nb = batch.size();
    if (unbatched) {  // shared by every batch entry (a paged store): no batch dims
      dims_.insert(dims_.begin(), nb, 1);
    }
    if (no_layers) {
      dims_.insert(dims_.begin() + std::min(nb, dims_.size()), 1);
    }
    if (dims_.size() != nb + core) {
      *error += std::string(name) + ": rank " + std::to_string(dims_.size()) + ", expected " +
                std::to_string(nb + core) + " " + Shape(dims) + "; ";
      return;
    }
    int64_t total = 1;
    for (size_t i = 0; i < nb; ++i) {
      if (dims_[i] != batch[i] && dims_[i] != 1) {
        *error += std::string(name) + ": batch dims " + Shape(dims) + " do not broadcast; ";
        return;
      }
      total *= batch[i];
    }
    core_elements_ = 1;
    for (size_t i = nb; i < dims_.size(); ++i) core_elements_ *= dims_[i];
    std::vector<int64_t> stride(nb);
    int64_t s = core_elements_;
    for (size_t i = nb; i-- > 0;) {
      stride[i] = dims_[i] == 1 ? 0 : s;
      s *= dims_[i];
    }
    offsets_.resize(total);
    std::vector<int64_t> index(nb, 0);
    for (int64_t b = 0; b < total; ++b) {
      int64_t off = 0;
      for (size_t i = 0; i < nb; ++i) off += index[i] * stride[i];
      offsets_[b] = off;
      for (size_t i = nb; i-- > 0;) {
        if (++index[i] < batch[i]) break;
        index[i] = 0;
      }
    }
    nb_ = nb;
  }
  int64_t Offset(int64_t b) const { return offsets_[b]; }
  int64_t Core(int i) const { return dims_[nb_ + i]; }

 private:
  const char* name_;
  std::vector<int64_t> dims_;
  size_t nb_ = 0;
  int64_t core_elements_ = 0;
  std::vector<int64_t> offsets_;
};

int ElementBytes(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return 4;
    case ffi::DataType::U16: return 2;
    case ffi::DataType::U8: return 1;
    default: return 0;
  }
}

// A tier leaf [batch..., L, H, S, W] (data) with scale/zero [batch..., L, H, S]
// or norms [batch..., L, H, S, K].
struct TierBuffers {
  const ffi::AnyBuffer* data;
  const ffi::AnyBuffer* aux0;  // q8/q4 scale, or TurboQuant norms
  const ffi::AnyBuffer* aux1;  // q8/q4 zero
};

// Which auxiliary leaves a store side (keys or values) has.
struct StoreSide {
  StoreSide(int32_t kind, int32_t norm_count)
      : lut_norms(kind == static_cast<int32_t>(ValueKind::kLut) && norm_count > 0),
        affine(kind == static_cast<int32_t>(ValueKind::kQ8) ||
               (kind == static_cast<int32_t>(ValueKind::kLut) && norm_count == 0)) {}
  bool aux() const { return affine || lut_norms; }
  int Aux0Core() const { return lut_norms ? 4 : aux() ? 3 : 1; }  // norms [.., K] or scale
  bool lut_norms;  // TurboQuant: bf16 norms per token
  bool affine;     // q8, q4: scale and zero per token
};

// A store side's TierFormat from the call's attributes; an error message if
// they do not fit its rows (`row_bytes`) or the tables.
std::string MakeStoreFormat(int32_t kind, int32_t lanes, int32_t row_bytes, int32_t norm_count,
                            ffi::Span<const int32_t> segments, ffi::Span<const float> kappa_scales,
                            const ffi::Buffer<ffi::F32>& tables, TierFormat* f) {
  if (kind < 0 || kind > static_cast<int32_t>(ValueKind::kLut)) return "unknown kind";
  if (segments.size() % 7 != 0 || segments.size() / 7 > kMaxSegments ||
      kappa_scales.size() != segments.size() / 7) {
    return "bad segment attributes";
  }
  f->kind = static_cast<ValueKind>(kind);
  f->lanes = lanes;
  f->row_bytes = row_bytes;
  f->norm_count = norm_count;
  f->tables = tables.typed_data();
  f->num_segments = static_cast<int32_t>(segments.size() / 7);
  for (int s = 0; s < f->num_segments; ++s) {
    const int32_t* v = segments.begin() + 7 * s;
    const Segment seg{v[0], v[1], v[2], v[3], v[4], v[5], v[6], kappa_scales.begin()[s]};
    const int64_t bytes = seg.bits == 3 ? seg.channels / 8 * 3 : seg.channels * seg.bits / 8;
    if (seg.bits < 1 || seg.bits > 4 || seg.code_offset + bytes > row_bytes ||
        seg.lane_offset + seg.channels > lanes ||
        seg.table_offset + (1 << seg.bits) > static_cast<int64_t>(tables.element_count()) ||
        seg.norm_index >= norm_count || seg.kappa_index >= norm_count) {
      return "segment " + std::to_string(s) + " does not fit the store rows";
    }
    f->segments[s] = seg;
  }
  if (f->kind == ValueKind::kLut && f->num_segments == 0) return "a packed format without segments";
  return "";
}

ffi::Error AttendImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_hot,
                      ffi::Buffer<ffi::F32> q_store, ffi::Buffer<ffi::S32> row_pos,
                      ffi::Buffer<ffi::S32> length, ffi::Buffer<ffi::S32> evicted,
                      ffi::Buffer<ffi::S32> tail_count, ffi::Buffer<ffi::S32> layer,
                      ffi::Buffer<ffi::S32> window, ffi::Buffer<ffi::F32> softcap,
                      ffi::AnyBuffer sink_k, ffi::AnyBuffer sink_v, ffi::AnyBuffer tail_k,
                      ffi::AnyBuffer tail_v, ffi::AnyBuffer store_k, ffi::AnyBuffer store_k_aux0,
                      ffi::AnyBuffer store_k_aux1, ffi::AnyBuffer store_v,
                      ffi::AnyBuffer store_v_aux0, ffi::AnyBuffer store_v_aux1,
                      ffi::Buffer<ffi::F32> tables, ffi::Buffer<ffi::S32> page_table,
                      ffi::ResultBuffer<ffi::F32> out_hot,
                      ffi::ResultBuffer<ffi::F32> out_store, int32_t hot_kind,
                      int32_t key_kind, int32_t key_norm_count,
                      ffi::Span<const int32_t> key_segments,
                      ffi::Span<const float> key_kappa_scales, int32_t value_kind,
                      int32_t value_norm_count, ffi::Span<const int32_t> value_segments,
                      ffi::Span<const float> value_kappa_scales, int32_t has_window,
                      int32_t has_softcap, int32_t has_layers, int32_t page_size) {
  const Selection& selection = ActiveKernels();
  if (!selection.kernels) {
    return ffi::Error::Internal("kvjax kernels not selected: " + selection.error);
  }
  const auto out_dims = out_hot->dimensions();
  if (out_dims.size() < 3) return ffi::Error::InvalidArgument("kvjax attend: out_hot rank < 3");
  const std::vector<int64_t> batch(out_dims.begin(), out_dims.end() - 3);
  const bool no_layers = has_layers == 0;
  // A paged pool: pages [N, H, page_size, ...], and the slots' hot tiers,
  // counters and page tables [S, ...], are shared by the batch; `layer`
  // ([batch...]) selects each entry's slot, which reads its store through
  // its page table row [max_pages].
  const bool paged = page_size > 0;
  if (paged && no_layers) {
    return ffi::Error::InvalidArgument("kvjax attend: a paged pool selects slots as layers");
  }
  std::string error;
  const Batched bq_hot("q_hot", q_hot.dimensions(), 3, batch, &error);
  const Batched bq_store("q_store", q_store.dimensions(), 3, batch, &error);
  const Batched brow("row_pos", row_pos.dimensions(), 1, batch, &error);
  const Batched blen("length", length.dimensions(), 1, batch, &error, no_layers, paged);
  const Batched bev("evicted", evicted.dimensions(), 1, batch, &error, no_layers, paged);
  const Batched btail("tail_count", tail_count.dimensions(), 1, batch, &error, no_layers, paged);
  const Batched blayer("layer", layer.dimensions(), 0, batch, &error);
  const Batched bwin("window", window.dimensions(), 0, batch, &error);
  const Batched bcap("softcap", softcap.dimensions(), 0, batch, &error);
  const Batched bsk("sink_k", sink_k.dimensions(), 4, batch, &error, no_layers, paged);
  const Batched bsv("sink_v", sink_v.dimensions(), 4, batch, &error, no_layers, paged);
  const Batched btk("tail_k", tail_k.dimensions(), 4, batch, &error, no_layers, paged);
  const Batched btv("tail_v", tail_v.dimensions(), 4, batch, &error, no_layers, paged);
  const StoreSide key_side(key_kind, key_norm_count), value_side(value_kind, value_norm_count);
  // A ring store has [batch..., L, H, slots, ...] (no L for one cache); a
  // paged one [N, H, page_size, ...], where N takes the place of L.
  const bool store_layers = no_layers && !paged;
  const Batched bstk("store_k", store_k.dimensions(), 4, batch, &error, store_layers, paged);
  const Batched bstv("store_v", store_v.dimensions(), 4, batch, &error, store_layers, paged);
  const Batched bsk0("store_k aux", store_k_aux0.dimensions(), key_side.Aux0Core(), batch, &error,
                     key_side.aux() && store_layers, paged);
  const Batched bsv0("store_v aux", store_v_aux0.dimensions(), value_side.Aux0Core(), batch, &error,
                     value_side.aux() && store_layers, paged);
  const Batched bsk1("store_k zero", store_k_aux1.dimensions(), key_side.affine ? 3 : 1, batch,
                     &error, key_side.affine && store_layers, paged);
  const Batched bsv1("store_v zero", store_v_aux1.dimensions(), value_side.affine ? 3 : 1, batch,
                     &error, value_side.affine && store_layers, paged);
  std::string unused;  // a ring store's call passes a dummy page table
  const Batched btable("page_table", page_table.dimensions(), 2, batch, paged ? &error : &unused,
                       false, true);
  if (!error.empty()) return ffi::Error::InvalidArgument("kvjax attend: " + error);

  AttendProblem p;
  p.heads = static_cast<int32_t>(bq_hot.Core(0));
  p.rows = static_cast<int32_t>(bq_hot.Core(1));
  const int32_t d = static_cast<int32_t>(bq_hot.Core(2));
  const int64_t layers = paged ? blen.Core(0) : bstk.Core(0);
  p.sinks = static_cast<int32_t>(bsk.Core(2));
  p.tail_slots = static_cast<int32_t>(btk.Core(2));
  p.store_slots = static_cast<int32_t>(bstk.Core(2));
  p.has_softcap = has_softcap != 0;
  if (paged) {
    p.page_size = static_cast<int32_t>(bstk.Core(2));
    p.num_pages = bstk.Core(0);
    p.max_pages = btable.Core(1);
    if (p.page_size != page_size || btable.Core(0) != layers) {
      return ffi::Error::InvalidArgument(
          "kvjax attend: pages of " + std::to_string(bstk.Core(2)) + " slots, page_size " +
          std::to_string(page_size) + ", page tables " + Shape(page_table.dimensions()) +
          " for " + std::to_string(layers) + " slots");
    }
  }
  p.hot.kind = static_cast<ValueKind>(hot_kind);
  p.hot.lanes = d;
  p.hot.row_bytes = d * ElementBytes(tail_k.element_type());
  if (const std::string e = MakeStoreFormat(key_kind, static_cast<int32_t>(bq_store.Core(2)),
                                             static_cast<int32_t>(bstk.Core(3)) *
                                                 ElementBytes(store_k.element_type()),
                                             key_norm_count, key_segments, key_kappa_scales,
                                             tables, &p.store_key);
      !e.empty()) {
    return ffi::Error::InvalidArgument("kvjax attend: keys: " + e);
  }
  if (const std::string e = MakeStoreFormat(value_kind, static_cast<int32_t>(out_store->dimensions().back()),
                                             static_cast<int32_t>(bstv.Core(3)) *
                                                 ElementBytes(store_v.element_type()),
                                             value_norm_count, value_segments, value_kappa_scales,
                                             tables, &p.store_value);
      !e.empty()) {
    return ffi::Error::InvalidArgument("kvjax attend: values: " + e);
  }
  // The shapes that tie the operands together.
  const auto same = [&](const Batched& b, std::initializer_list<int64_t> core) {
    int i = 0;
    for (int64_t c : core) {
      if (c >= 0 && b.Core(i) != c) return false;
      ++i;
    }
    return true;
  };
  if (!same(bq_store, {p.heads, p.rows, -1}) || !same(brow, {p.rows}) ||
      !same(blen, {layers}) || !same(bev, {layers}) || !same(btail, {layers}) ||
      !same(bsk, {layers, p.heads, -1, d}) || !same(bsv, {layers, p.heads, p.sinks, d}) ||
      !same(btk, {layers, p.heads, -1, d}) || !same(btv, {layers, p.heads, p.tail_slots, d}) ||
      !same(bstk, {paged ? -1 : layers, p.heads, -1, -1}) ||
      !same(bstv, {paged ? p.num_pages : layers, p.heads, p.store_slots, -1}) ||
      ElementBytes(tail_k.element_type()) == 0 || ElementBytes(store_k.element_type()) == 0 ||
      ElementBytes(store_v.element_type()) == 0 ||
      sink_k.element_type() != tail_k.element_type()) {
    return ffi::Error::InvalidArgument(
        "kvjax attend: operand shapes do not fit together: q_hot " + Shape(q_hot.dimensions()) +
        ", q_store " + Shape(q_store.dimensions()) + ", tail_k " + Shape(tail_k.dimensions()) +
        ", store_k " + Shape(store_k.dimensions()) + ", store_v " + Shape(store_v.dimensions()));
  }

  int64_t num = 1;
  for (int64_t b : batch) num *= b;
  std::vector<SequenceView> seqs(num);
  const auto view = [&](const ffi::AnyBuffer& data, const Batched& bd, const ffi::AnyBuffer* aux0,
                        const Batched* b0, const ffi::AnyBuffer* aux1, const Batched* b1,
                        int64_t b, int64_t l, bool norms) {
    TierView t;
    const int bytes = ElementBytes(data.element_type());
    const int64_t heads = bd.Core(1), slots = bd.Core(2), width = bd.Core(3);
    t.head_slots = slots;
    t.head_bytes = slots * width * bytes;
    t.base.data = static_cast<const uint8_t*>(data.untyped_data()) +
                  (bd.Offset(b) + l * heads * slots * width) * bytes;
    if (aux0 && norms) {
      t.base.norms = static_cast<const uint16_t*>(aux0->untyped_data()) + b0->Offset(b) +
                     l * heads * slots * b0->Core(3);
    } else if (aux0) {
      t.base.scale = static_cast<const float*>(aux0->untyped_data()) + b0->Offset(b) + l * heads * slots;
      t.base.zero = static_cast<const float*>(aux1->untyped_data()) + b1->Offset(b) + l * heads * slots;
    }
    return t;
  };
  for (int64_t b = 0; b < num; ++b) {
    SequenceView& s = seqs[b];
    const int32_t l = layer.typed_data()[blayer.Offset(b)];
    s.layer_ok = l >= 0 && l < layers;
    const int64_t li = s.layer_ok ? l : 0;
    s.length = length.typed_data()[blen.Offset(b) + li];
    s.evicted = evicted.typed_data()[bev.Offset(b) + li];
    s.tail_count = tail_count.typed_data()[btail.Offset(b) + li];
    s.q_hot = q_hot.typed_data() + bq_hot.Offset(b);
    s.q_store = q_store.typed_data() + bq_store.Offset(b);
    s.row_pos = row_pos.typed_data() + brow.Offset(b);
    s.has_window = has_window != 0;
    s.window = window.typed_data()[bwin.Offset(b)];
    s.softcap = softcap.typed_data()[bcap.Offset(b)];
    s.sink_k = view(sink_k, bsk, nullptr, nullptr, nullptr, nullptr, b, li, false);
    s.sink_v = view(sink_v, bsv, nullptr, nullptr, nullptr, nullptr, b, li, false);
    s.tail_k = view(tail_k, btk, nullptr, nullptr, nullptr, nullptr, b, li, false);
    s.tail_v = view(tail_v, btv, nullptr, nullptr, nullptr, nullptr, b, li, false);
    // Paged: the store views are page 0's, and the slot picks a page table row.
    const int64_t store_layer = paged ? 0 : li;
    s.store_k = view(store_k, bstk, key_side.aux() ? &store_k_aux0 : nullptr, &bsk0, &store_k_aux1,
                     &bsk1, b, store_layer, key_side.lut_norms);
    s.store_v = view(store_v, bstv, value_side.aux() ? &store_v_aux0 : nullptr, &bsv0,
                     &store_v_aux1, &bsv1, b, store_layer, value_side.lut_norms);
    if (paged) s.page_table = page_table.typed_data() + btable.Offset(b) + li * p.max_pages;
    s.out_hot = out_hot->typed_data() + b * p.heads * p.rows * d;
    s.out_store = out_store->typed_data() + b * p.heads * p.rows * p.store_value.lanes;
  }
  p.num_sequences = num;
  p.sequences = seqs.data();
  // One thread per pool thread, the caller included (XLA's pool has one per
  // core), each claiming one item at a time: items differ in size.
  const int threads = std::max<int>(1, static_cast<int>(pool.num_threads()));
  RunAttend(p, selection.kernels->attend, threads,
            [&](int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
              ParallelFor(pool, n, 1, fn, /*max_chunks=*/n, /*pool_tasks=*/threads - 1);
            });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Attend, AttendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_hot
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_store
                                  .Arg<ffi::Buffer<ffi::S32>>()  // row_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // length
                                  .Arg<ffi::Buffer<ffi::S32>>()  // evicted
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tail_count
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // window
                                  .Arg<ffi::Buffer<ffi::F32>>()  // softcap
                                  .Arg<ffi::AnyBuffer>()         // sink_k
                                  .Arg<ffi::AnyBuffer>()         // sink_v
                                  .Arg<ffi::AnyBuffer>()         // tail_k
                                  .Arg<ffi::AnyBuffer>()         // tail_v
                                  .Arg<ffi::AnyBuffer>()         // store_k
                                  .Arg<ffi::AnyBuffer>()         // store_k scale / norms
                                  .Arg<ffi::AnyBuffer>()         // store_k zero
                                  .Arg<ffi::AnyBuffer>()         // store_v
                                  .Arg<ffi::AnyBuffer>()         // store_v scale / norms
                                  .Arg<ffi::AnyBuffer>()         // store_v zero
                                  .Arg<ffi::Buffer<ffi::F32>>()  // tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_table
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out_hot
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out_store
                                  .Attr<int32_t>("hot_kind")
                                  .Attr<int32_t>("key_kind")
                                  .Attr<int32_t>("key_norm_count")
                                  .Attr<ffi::Span<const int32_t>>("key_segments")
                                  .Attr<ffi::Span<const float>>("key_kappa_scales")
                                  .Attr<int32_t>("value_kind")
                                  .Attr<int32_t>("value_norm_count")
                                  .Attr<ffi::Span<const int32_t>>("value_segments")
                                  .Attr<ffi::Span<const float>>("value_kappa_scales")
                                  .Attr<int32_t>("has_window")
                                  .Attr<int32_t>("has_softcap")
                                  .Attr<int32_t>("has_layers")
                                  .Attr<int32_t>("page_size"));

}  // namespace kvjax
