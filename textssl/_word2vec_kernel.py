"""word2vec's negative-sampling step on CPU as one compiled loop over rows (C++, built on first use), and
the batch building before it (`w2v_context_rows`, `w2v_noise_words`: the rows the tensor-op collate builds).

`NegativeSamplingStep` is a handful of tensor ops, each of which reads or writes a whole (predictions x
window x dim) tensor; on CPU their separate passes, not the arithmetic, set its speed. This kernel does
what word2vec.c's loop does, row by row in one pass: gather (CBOW: pool) the input rows, dot them with
the target's and each negative's output row, take the sigmoid error, and add each table's gradient
straight into one row per distinct word -- without applying it: the optimizer step stays the shared
trainer's (DDP, accumulation, LR schedule, exact resume).

The source is plain C++ (no torch or Python headers: it compiles in about a second, where a torch
extension took minutes), kept here as a string so an installed package carries it. It is built once per
machine with the system's C++ compiler ($CXX, else c++ / g++ / clang++) into torch's extensions cache
($TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions), under a name that hashes the source and flags,
and called through ctypes (which releases the GIL) on the tensors' memory. The dot products and row
updates are 100-float loops: built twice, for AVX2+FMA and for the baseline instruction set, and picked by
what the CPU supports when the kernel runs, so one build serves any x86-64 machine that shares the cache.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

FLAGS = ["-O3", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC"]
"""-fopenmp-simd: honour `omp simd` (vectorised dot products and row updates) without OpenMP threads."""

SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

#define W2V_INLINE inline __attribute__((always_inline))

W2V_INLINE float dot(const float* a, const float* b, int64_t n) {
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += a[i] * b[i];
  return total;
}

W2V_INLINE void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

W2V_INLINE void scale(float alpha, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

// The loss, sum over scores of softplus(m) = max(m, 0) + log(1 + exp(-|m|)) (m = -score for the word to
// predict, score for a noise word), kept as a sum of the linear parts and a product of the (1 + exp(-|m|)),
// each in (1, 2]: one log per ~500 terms instead of one per term (the log was a third of skip-gram's loop).
struct Loss {
  double linear = 0.0, product = 1.0, logs = 0.0;
  W2V_INLINE void add(float margin, float z) {
    linear += margin > 0.0f ? margin : 0.0f;
    product *= 1.0 + double(z);
    if (product > 1e150) flush();
  }
  void flush() {
    logs += std::log(product);
    product = 1.0;
  }
  double total() {
    flush();
    return linear + logs;
  }
};

// sigmoid(score), adding softplus(-score) (the word to predict) or softplus(score) (a noise word) to the
// loss, from one exp.
W2V_INLINE float logistic(float score, bool positive, Loss& loss) {
  const float z = std::exp(-std::fabs(score));
  loss.add(positive ? -score : score, z);
  return score >= 0.0f ? 1.0f / (1.0f + z) : z / (1.0f + z);
}

struct Step {
  const float* input_weight;
  const float* output_weight;
  int64_t dim;
  const int64_t* inputs;       // (rows, slots): input word ids
  const bool* context_mask;    // (rows, slots): which slots hold one
  int64_t rows, slots;
  const int64_t* targets;      // (rows, width): the word to predict, then its negatives
  const bool* negative_mask;   // (rows, width - 1): which negatives count
  int64_t width;
  bool cbow, cbow_mean, implicit, grads, prefetch;
  const int32_t* input_row;    // word -> its row in input_sums
  const int32_t* output_row;   // word -> its row in output_sums
  float* input_sums;           // (distinct input words, dim)
  float* output_sums;          // (distinct output words, dim)
  double* input_curvature;     // (distinct input words,), with `implicit`
  double* output_curvature;    // (distinct output words,), with `implicit`
  Loss loss;
};

W2V_INLINE bool kept(const Step& s, int64_t row, int64_t k) {
  return k == 0 || s.negative_mask[row * (s.width - 1) + k - 1];
}

// scores[k] = hidden . outputs[k], four at a time: one pass over hidden, four independent sums.
W2V_INLINE void dots(const float* hidden, const float* const* outputs, int64_t n, int64_t dim, float* scores) {
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const float *o0 = outputs[k], *o1 = outputs[k + 1], *o2 = outputs[k + 2], *o3 = outputs[k + 3];
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < dim; ++i) {
      const float h = hidden[i];
      s0 += h * o0[i];
      s1 += h * o1[i];
      s2 += h * o2[i];
      s3 += h * o3[i];
    }
    scores[k] = s0;
    scores[k + 1] = s1;
    scores[k + 2] = s2;
    scores[k + 3] = s3;
  }
  for (; k < n; ++k) scores[k] = dot(hidden, outputs[k], dim);
}

// y += sum_k weights[k] * rows[k], four rows a pass.
W2V_INLINE void add_combination(float* y, const float* const* rows, const float* weights, int64_t n, int64_t dim) {
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const float *r0 = rows[k], *r1 = rows[k + 1], *r2 = rows[k + 2], *r3 = rows[k + 3];
    const float w0 = weights[k], w1 = weights[k + 1], w2 = weights[k + 2], w3 = weights[k + 3];
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) y[i] += w0 * r0[i] + w1 * r1[i] + w2 * r2[i] + w3 * r3[i];
  }
  for (; k < n; ++k) axpy(weights[k], rows[k], y, dim);
}

// rows[k] += weights[k] * x for every k (rows may repeat: a noise word drawn twice gets both terms).
W2V_INLINE void add_to_each(float* const* rows, const float* weights, const float* x, int64_t n, int64_t dim) {
  for (int64_t k = 0; k < n; ++k) axpy(weights[k], x, rows[k], dim);
}

// A row's kept outputs (the target first), their gradient rows and, with `implicit`, squared norms.
struct Outputs {
  std::vector<const float*> rows;
  std::vector<float*> sums;
  std::vector<int32_t> index;
  std::vector<float> norms, scores, errors;
  int64_t n = 0;
  explicit Outputs(int64_t width)
      : rows(width), sums(width), index(width), norms(width), scores(width), errors(width) {}

  W2V_INLINE void gather(const Step& s, int64_t r) {
    const int64_t* targets = s.targets + r * s.width;
    n = 0;
    for (int64_t k = 0; k < s.width; ++k) {
      if (!kept(s, r, k)) continue;
      rows[n] = s.output_weight + targets[k] * s.dim;
      if (s.grads) {
        index[n] = s.output_row[targets[k]];
        sums[n] = s.output_sums + int64_t(index[n]) * s.dim;
      }
      if (s.implicit) norms[n] = dot(rows[n], rows[n], s.dim);
      ++n;
    }
  }

  // Scores of `hidden`, their loss, and the errors sigmoid(score) - label (the target is output 0).
  W2V_INLINE void score(Step& s, const float* hidden) {
    dots(hidden, rows.data(), n, s.dim, scores.data());
    for (int64_t k = 0; k < n; ++k) errors[k] = logistic(scores[k], k == 0, s.loss) - (k == 0 ? 1.0f : 0.0f);
  }

  // Curvature of the logistic loss, p (1 - p) = error (1 - error) for a noise word and -error (1 + error)
  // for the target; returns the input side's sum over outputs, adds each output's.
  W2V_INLINE double curvature(Step& s, float hidden_norm) {
    double input_side = 0.0;
    for (int64_t k = 0; k < n; ++k) {
      const double p = k == 0 ? double(errors[k]) + 1.0 : double(errors[k]);
      const double c = p * (1.0 - p);
      input_side += c * norms[k];
      s.output_curvature[index[k]] += c * hidden_norm;
    }
    return input_side;
  }
};

W2V_INLINE void cbow_row(Step& s, int64_t r, Outputs& out, float* hidden, float* row_grad) {
  const int64_t dim = s.dim;
  const int64_t* ids = s.inputs + r * s.slots;
  const bool* valid = s.context_mask + r * s.slots;
  for (int64_t i = 0; i < dim; ++i) hidden[i] = 0.0f;
  int64_t count = 0;
  for (int64_t j = 0; j < s.slots; ++j) {
    if (!valid[j]) continue;
    axpy(1.0f, s.input_weight + ids[j] * dim, hidden, dim);
    ++count;
  }
  if (s.cbow_mean && count > 0) scale(1.0f / count, hidden, dim);
  out.gather(s, r);
  out.score(s, hidden);
  if (!s.grads) return;
  add_to_each(out.sums.data(), out.errors.data(), hidden, out.n, dim);
  const double input_curvature = s.implicit ? out.curvature(s, dot(hidden, hidden, dim)) : 0.0;
  if (count == 0) return;
  // Every context word gets the pooled input's gradient whole (word2vec.c), / count for a summed context.
  for (int64_t i = 0; i < dim; ++i) row_grad[i] = 0.0f;
  add_combination(row_grad, out.rows.data(), out.errors.data(), out.n, dim);
  if (!s.cbow_mean) scale(1.0f / count, row_grad, dim);
  for (int64_t j = 0; j < s.slots; ++j) {
    if (!valid[j]) continue;
    const int32_t in = s.input_row[ids[j]];
    axpy(1.0f, row_grad, s.input_sums + int64_t(in) * dim, dim);
    if (s.implicit) s.input_curvature[in] += input_curvature / count;
  }
}

W2V_INLINE void skipgram_row(Step& s, int64_t r, Outputs& out) {
  const int64_t dim = s.dim;
  const int64_t* ids = s.inputs + r * s.slots;
  const bool* valid = s.context_mask + r * s.slots;
  out.gather(s, r);
  for (int64_t j = 0; j < s.slots; ++j) {
    if (!valid[j]) continue;
    const float* hidden = s.input_weight + ids[j] * dim;
    out.score(s, hidden);
    if (!s.grads) continue;
    const int32_t in = s.input_row[ids[j]];
    add_combination(s.input_sums + int64_t(in) * dim, out.rows.data(), out.errors.data(), out.n, dim);
    add_to_each(out.sums.data(), out.errors.data(), hidden, out.n, dim);
    if (s.implicit) s.input_curvature[in] += out.curvature(s, dot(hidden, hidden, dim));
  }
}

// Ask for the table rows row r reads while the row before it is computed: the rows are scattered over
// tables of several MB, and waiting on each one's cache misses in turn is much of a row's time.
W2V_INLINE void prefetch_row(const Step& s, int64_t r) {
  if (r >= s.rows) return;
  const int64_t bytes = s.dim * int64_t(sizeof(float));
  const int64_t* ids = s.inputs + r * s.slots;
  const bool* valid = s.context_mask + r * s.slots;
  for (int64_t j = 0; j < s.slots; ++j) {
    if (!valid[j]) continue;
    const char* row = reinterpret_cast<const char*>(s.input_weight + ids[j] * s.dim);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b);
  }
  const int64_t* targets = s.targets + r * s.width;
  for (int64_t k = 0; k < s.width; ++k) {
    const char* row = reinterpret_cast<const char*>(s.output_weight + targets[k] * s.dim);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b);
  }
}

W2V_INLINE void run_rows(Step& s) {
  std::vector<float> scratch(2 * s.dim);
  Outputs out(s.width);
  for (int64_t r = 0; r < s.rows; ++r) {
    if (s.prefetch) prefetch_row(s, r + 1);
    if (s.cbow)
      cbow_row(s, r, out, scratch.data(), scratch.data() + s.dim);
    else
      skipgram_row(s, r, out);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2,fma"))) void run_rows_avx2(Step& s) { run_rows(s); }
#define W2V_HAS_AVX2_BUILD 1
#endif
void run_rows_baseline(Step& s) { run_rows(s); }

bool use_avx2() {
#ifdef W2V_HAS_AVX2_BUILD
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}


// The distinct words of `ids` where `valid` (null: all), ascending, into `words`; `row` maps each word of the
// vocabulary to its position among them (-1: absent). Returns their count, or -1 - i where ids[i] is not a
// word of the vocabulary.
int64_t index_words(const int64_t* ids, const bool* valid, int64_t n, int64_t vocab, int32_t* row, int64_t* words) {
  for (int64_t w = 0; w < vocab; ++w) row[w] = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (valid != nullptr && !valid[i]) continue;
    if (ids[i] < 0 || ids[i] >= vocab) return -1 - i;
    row[ids[i]] = 1;
  }
  int32_t count = 0;
  for (int64_t w = 0; w < vocab; ++w) {
    if (row[w]) {
      words[count] = w;
      row[w] = count++;
    } else {
      row[w] = -1;
    }
  }
  return count;
}

}  // namespace

extern "C" {

int w2v_uses_avx2() { return use_avx2() ? 1 : 0; }

// Batch building after the random draws (which stay torch's, per example, so a batch is the same whichever
// builds it): subsampling, each kept position's window, the rows of input slots and the word to predict.
// Positions: `ids`, with `uniform` (the subsampling draw) and `reduced` (the window shrink; null = none);
// `lengths`: the sentences' lengths in order, `sizes`: the examples' (each a run of whole sentences). Rows
// go into `rows` (row stride `stride`; the first `slots` columns the input word ids, -1 where a slot holds no
// context, then the word to predict; the columns after it are left for the negatives): with `pairs`, one
// row per (context, centre) pair and one slot, else one row per centre with at least one context and
// 2 x window slots (offsets -window..-1, 1..window). `spans[row]`: its centre's window; `per_example[e]`:
// rows of example e. Returns the row count, or -1 - i where ids[i] is not a word of the vocabulary.
int64_t w2v_context_rows(const int64_t* ids, const float* uniform, const int64_t* reduced, int64_t n,
                         const int64_t* lengths, int64_t sentences, const int64_t* sizes, int64_t examples,
                         const float* keep_probability, int64_t vocab, int64_t window, int pairs, int64_t* rows,
                         int64_t stride, int64_t* spans, int64_t* per_example) {
  struct Kept {
    int64_t position, sentence, example;
  };
  std::vector<Kept> kept;
  kept.reserve(n);
  int64_t sentence = 0, sentence_end = 0, example = 0, example_end = 0;
  for (int64_t i = 0; i < n; ++i) {
    while (i >= sentence_end && sentence < sentences) sentence_end += lengths[sentence++];
    while (i >= example_end && example < examples) example_end += sizes[example++];
    if (ids[i] < 0 || ids[i] >= vocab) return -1 - i;
    if (uniform[i] < keep_probability[ids[i]]) kept.push_back({i, sentence, example - 1});
  }
  const int64_t k = int64_t(kept.size()), slots = pairs ? 1 : 2 * window;
  int64_t count = 0;
  for (int64_t p = 0; p < k; ++p) {
    const Kept& centre = kept[p];
    const int64_t span = window - (reduced ? reduced[centre.position] : 0);
    int64_t* row = rows + count * stride;
    bool any = false;
    for (int64_t slot = 0; slot < 2 * window; ++slot) {
      const int64_t offset = slot < window ? slot - window : slot - window + 1;
      const int64_t q = p + offset;
      const bool context = q >= 0 && q < k && (offset < 0 ? -offset : offset) <= span &&
                           kept[q].sentence == centre.sentence;
      if (pairs) {
        if (!context) continue;
        row[0] = ids[kept[q].position];
        row[1] = ids[centre.position];
        spans[count] = span;
        ++per_example[centre.example];
        row = rows + ++count * stride;
      } else {
        row[slot] = context ? ids[kept[q].position] : -1;
        any = any || context;
      }
    }
    if (!pairs && any) {
      row[slots] = ids[centre.position];
      spans[count] = span;
      ++per_example[centre.example];
      ++count;
    }
  }
  return count;
}

// Noise words from float64 uniforms by Walker's alias table (`NoiseSampler.words`, the same arithmetic): the
// integer part of u x words is the column, the fraction picks its word or its alias. Word j of row r goes to
// rows[r * stride + first + j], `negative` per row.
void w2v_noise_words(const double* uniform, int64_t rows_count, int64_t negative, const double* accept,
                     const int64_t* alias, int64_t vocab, int64_t* rows, int64_t stride, int64_t first) {
  for (int64_t r = 0; r < rows_count; ++r) {
    for (int64_t j = 0; j < negative; ++j) {
      const double spread = uniform[r * negative + j] * double(vocab);
      int64_t column = int64_t(spread);
      if (column > vocab - 1) column = vocab - 1;
      rows[r * stride + first + j] = spread - double(column) < accept[column] ? column : alias[column];
    }
  }
}

// Input words: the valid context slots.
int64_t w2v_index_inputs(const int64_t* inputs, const bool* context_mask, int64_t n, int64_t vocab, int32_t* row,
                         int64_t* words) {
  return index_words(inputs, context_mask, n, vocab, row, words);
}

// Output words: every row's target and the negatives that count.
int64_t w2v_index_targets(const int64_t* targets, const bool* negative_mask, int64_t rows, int64_t width,
                          int64_t vocab, int32_t* row, int64_t* words) {
  std::vector<uint8_t> keep(rows * width);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < width; ++k) keep[r * width + k] = k == 0 || negative_mask[r * (width - 1) + k - 1];
  return index_words(targets, reinterpret_cast<const bool*>(keep.data()), rows * width, vocab, row, words);
}

// The step over all rows: returns the summed loss; with grads, adds each table's gradient into its words'
// rows of input_sums / output_sums (zeroed by the caller) and, with implicit, their curvature.
double w2v_step(const float* input_weight, const float* output_weight, int64_t dim, const int64_t* inputs,
                const bool* context_mask, int64_t rows, int64_t slots, const int64_t* targets,
                const bool* negative_mask, int64_t width, int flags, const int32_t* input_row,
                const int32_t* output_row, float* input_sums, float* output_sums, double* input_curvature,
                double* output_curvature) {
  Step s{};
  s.input_weight = input_weight;
  s.output_weight = output_weight;
  s.dim = dim;
  s.inputs = inputs;
  s.context_mask = context_mask;
  s.rows = rows;
  s.slots = slots;
  s.targets = targets;
  s.negative_mask = negative_mask;
  s.width = width;
  s.cbow = flags & 1;
  s.cbow_mean = flags & 2;
  s.grads = flags & 8;
  s.implicit = (flags & 4) && s.grads;
  s.prefetch = !(flags & 16);
  s.input_row = input_row;
  s.output_row = output_row;
  s.input_sums = input_sums;
  s.output_sums = output_sums;
  s.input_curvature = input_curvature;
  s.output_curvature = output_curvature;
#ifdef W2V_HAS_AVX2_BUILD
  if (use_avx2())
    run_rows_avx2(s);
  else
#endif
    run_rows_baseline(s);
  return s.loss.total();
}

}  // extern "C"
"""


def cache_dir() -> Path:
    """Where built kernels are kept: torch's extensions cache."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "selfsup_word2vec_step"


def _compiler() -> str:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")


def build() -> Path:
    """The shared library for this source, flags and machine: compiled now unless the cache has it."""
    compiler = _compiler()
    key = hashlib.sha256("\n".join([SOURCE, *FLAGS, compiler, platform.machine()]).encode()).hexdigest()[:16]
    library = cache_dir() / f"word2vec_step_{key}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        source = Path(scratch) / "word2vec_step.cpp"
        source.write_text(SOURCE)
        built = Path(scratch) / library.name
        run = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {' '.join(run.stderr.split())[-500:]}")
        os.replace(built, library)  # atomic: a process that loads it meanwhile sees all of it or nothing
    return library


def _require_cpu_tensor(what: str, name: str, tensor: torch.Tensor, dtype: torch.dtype, dim: int,
                        size: int | None = None) -> None:
    """The library reads `tensor`'s memory as given: a contiguous CPU tensor of `dtype`, `dim`-d (`size` rows)."""
    if (tensor.device.type != "cpu" or tensor.dtype != dtype or tensor.dim() != dim or not tensor.is_contiguous()
            or size not in (None, len(tensor))):
        raise ValueError(f"word2vec {what}: {name} must be a contiguous {dim}-d CPU tensor of {dtype}"
                         f"{'' if size is None else f' ({size} rows)'}, got {tensor.dtype} of shape "
                         f"{tuple(tensor.shape)} on {tensor.device}")


class CompiledStep:
    """The built library, called on tensors (`negative_sampling_step`, `context_rows`, `noise_words`)."""

    def __init__(self, library: Path):
        self.library = library
        lib = ctypes.CDLL(str(library))
        pointer, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.w2v_uses_avx2.restype = ctypes.c_int
        lib.w2v_index_inputs.argtypes = [pointer, pointer, i64, i64, pointer, pointer]
        lib.w2v_index_inputs.restype = i64
        lib.w2v_index_targets.argtypes = [pointer, pointer, i64, i64, i64, pointer, pointer]
        lib.w2v_index_targets.restype = i64
        lib.w2v_step.argtypes = [pointer, pointer, i64, pointer, pointer, i64, i64, pointer, pointer, i64, ctypes.c_int,
                                 pointer, pointer, pointer, pointer, pointer, pointer]
        lib.w2v_step.restype = ctypes.c_double
        lib.w2v_context_rows.argtypes = [pointer, pointer, pointer, i64, pointer, i64, pointer, i64, pointer, i64,
                                         i64, ctypes.c_int, pointer, i64, pointer, pointer]
        lib.w2v_context_rows.restype = i64
        lib.w2v_noise_words.argtypes = [pointer, i64, i64, pointer, pointer, i64, pointer, i64, i64]
        lib.w2v_noise_words.restype = None
        self.lib = lib
        self.prefetch = True

    def uses_avx2(self) -> bool:
        return bool(self.lib.w2v_uses_avx2())

    def negative_sampling_step(self, input_weight: torch.Tensor, output_weight: torch.Tensor, inputs: torch.Tensor,
                               context_mask: torch.Tensor, targets: torch.Tensor, negative_mask: torch.Tensor,
                               cbow: bool, cbow_mean: bool, implicit: bool, grads: bool) -> tuple[torch.Tensor, ...]:
        """(loss, input words ascending, their summed gradient rows, their summed curvature, output words, rows,
        curvature) of a batch laid out as `NegativeSamplingStep` takes it; rows and curvature are empty unless
        `grads` (curvature: unless also `implicit`)."""
        for name, tensor, dtype in (("input_weight", input_weight, torch.float32),
                                    ("output_weight", output_weight, torch.float32), ("inputs", inputs, torch.int64),
                                    ("context_mask", context_mask, torch.bool), ("targets", targets, torch.int64),
                                    ("negative_mask", negative_mask, torch.bool)):
            _require_cpu_tensor("step", name, tensor, dtype, 2)
        (vocab, dim), (rows, width) = input_weight.shape, targets.shape
        if (output_weight.shape != input_weight.shape or width < 1 or context_mask.shape != inputs.shape
                or len(inputs) != rows or negative_mask.shape != (rows, width - 1)):
            raise ValueError(f"word2vec step: tables {tuple(input_weight.shape)} and {tuple(output_weight.shape)}, "
                             f"inputs {tuple(inputs.shape)}, context_mask {tuple(context_mask.shape)}, targets "
                             f"{tuple(targets.shape)} and negative_mask {tuple(negative_mask.shape)} do not fit together")
        lib = self.lib
        input_row, output_row = torch.empty(vocab, dtype=torch.int32), torch.empty(vocab, dtype=torch.int32)
        input_words, output_words = torch.empty(inputs.numel(), dtype=torch.int64), torch.empty(targets.numel(),
                                                                                                 dtype=torch.int64)
        # Every id is checked against the vocabulary here, before the loop reads a row.
        found = lib.w2v_index_inputs(inputs.data_ptr(), context_mask.data_ptr(), inputs.numel(), vocab,
                                     input_row.data_ptr(), input_words.data_ptr())
        if found < 0:
            raise IndexError(f"word2vec step: input word id {int(inputs.view(-1)[-1 - found])} is outside the "
                             f"vocabulary of {vocab} words")
        input_words = input_words[:found]
        found = lib.w2v_index_targets(targets.data_ptr(), negative_mask.data_ptr(), rows, width, vocab,
                                      output_row.data_ptr(), output_words.data_ptr())
        if found < 0:
            raise IndexError(f"word2vec step: target or negative word id {int(targets.view(-1)[-1 - found])} is "
                             f"outside the vocabulary of {vocab} words")
        output_words = output_words[:found]
        implicit = implicit and grads
        input_sums = torch.zeros(len(input_words) if grads else 0, dim)
        output_sums = torch.zeros(len(output_words) if grads else 0, dim)
        input_curvature = torch.zeros(len(input_words) if implicit else 0, dtype=torch.float64)
        output_curvature = torch.zeros(len(output_words) if implicit else 0, dtype=torch.float64)
        flags = cbow | cbow_mean << 1 | implicit << 2 | grads << 3 | (not self.prefetch) << 4
        loss = lib.w2v_step(input_weight.data_ptr(), output_weight.data_ptr(), dim, inputs.data_ptr(),
                            context_mask.data_ptr(), rows, inputs.shape[1], targets.data_ptr(), negative_mask.data_ptr(),
                            width, flags, input_row.data_ptr(), output_row.data_ptr(), input_sums.data_ptr(),
                            output_sums.data_ptr(), input_curvature.data_ptr(), output_curvature.data_ptr())
        return (torch.tensor(loss, dtype=torch.float32), input_words, input_sums, input_curvature, output_words,
                output_sums, output_curvature)

    def context_rows(self, ids: torch.Tensor, uniform: torch.Tensor, reduced: torch.Tensor | None,
                     lengths: torch.Tensor, sizes: torch.Tensor, keep_probability: torch.Tensor, window: int,
                     pairs: bool, negative: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, spans, rows per example) of a batch's positions (see `w2v_context_rows`): `rows` is
        (rows, slots + 1 + negative) int64, its last `negative` columns left for the negatives."""
        n = len(ids)
        for name, tensor, dtype, size in (("ids", ids, torch.int64, n), ("uniform", uniform, torch.float32, n),
                                          ("reduced", reduced, torch.int64, n), ("lengths", lengths, torch.int64, None),
                                          ("sizes", sizes, torch.int64, None),
                                          ("keep_probability", keep_probability, torch.float32, None)):
            if tensor is not None:
                _require_cpu_tensor("batch", name, tensor, dtype, 1, size)
        if int(lengths.sum()) != n or int(sizes.sum()) != n:
            raise ValueError(f"word2vec batch: sentence lengths (sum {int(lengths.sum())}) and example sizes (sum "
                             f"{int(sizes.sum())}) must cover the {n} positions")
        slots = 1 if pairs else 2 * window
        stride = slots + 1 + negative
        capacity = n * 2 * window if pairs else n
        rows = torch.empty(capacity, stride, dtype=torch.int64)
        spans = torch.empty(capacity, dtype=torch.int64)
        per_example = torch.zeros(len(sizes), dtype=torch.int64)
        count = self.lib.w2v_context_rows(
            ids.data_ptr(), uniform.data_ptr(), None if reduced is None else reduced.data_ptr(), n,
            lengths.data_ptr(), len(lengths), sizes.data_ptr(), len(sizes), keep_probability.data_ptr(),
            len(keep_probability), window, int(pairs), rows.data_ptr(), stride, spans.data_ptr(),
            per_example.data_ptr())
        if count < 0:
            raise IndexError(f"word2vec batch: word id {int(ids[-1 - count])} is outside the vocabulary of "
                             f"{len(keep_probability)} words")
        return rows[:count], spans[:count], per_example

    def noise_words(self, uniform: torch.Tensor, accept: torch.Tensor, alias: torch.Tensor, rows: torch.Tensor,
                    negative: int) -> None:
        """Fill the last `negative` columns of `rows` (contiguous int64) with the noise words the float64
        `uniform` draws pick from the alias table (`NoiseSampler.words`)."""
        if (uniform.dtype != torch.float64 or not uniform.is_contiguous() or uniform.numel() != len(rows) * negative
                or rows.dtype != torch.int64 or not rows.is_contiguous() or accept.dtype != torch.float64
                or alias.dtype != torch.int64 or len(accept) != len(alias)):
            raise ValueError("word2vec batch: noise draws, alias table or rows do not fit together")
        self.lib.w2v_noise_words(uniform.data_ptr(), len(rows), negative, accept.data_ptr(), alias.data_ptr(),
                                 len(accept), rows.data_ptr(), rows.shape[1], rows.shape[1] - negative)


def load() -> CompiledStep:
    """Build (first time on this machine, about a second) or find the kernel, and load it; raises, saying why,
    if it cannot be built."""
    return CompiledStep(build())
