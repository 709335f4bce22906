// The code paths of concurrent backends (backend::cuda), run on the CPU: a test backend whose
// loop primitives run their iterations in an order other than the CPU's (reversed, or
// forward), within each primitive's contract, and whose add_row_sums, add_broadcast_sums and lane
// groups are those of backend::cuda. Every op's value and
// gradients must match the CPU backend (tolerance: the sums run in another order), and the two
// orders must agree bit for bit: were two iterations to add into one element (a race on a GPU),
// the sum's rounding would depend on their order.
#include "ckpt/detail/runs.hpp"
#include "support/backend_checks.hpp"

#include <barrier>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

using namespace ckpt;
using namespace ckpt::test;

namespace {

template <bool Reverse>
struct ordered_cpu : backend::cpu {
  static constexpr const char* name = Reverse ? "reversed_cpu" : "forward_cpu";
  template <class F>
  static void for_each(long n, const F& f) {
    for (long k = 0; k < n; ++k) f(Reverse ? n - 1 - k : k);
  }
  template <class T, class V>
  static void assign(long n, T* out, const V& value) {
    for_each(n, [&](long i) { out[i] = value(i); });
  }
  template <class T, class V>
  static void assign_2d(shape s, T* out, const V& value) {
    for_each_2d(s, [&](int r, int c) { out[r + static_cast<long>(c) * s.rows] = value(r, c); });
  }
  template <class F>
  static void for_each_2d(shape s, const F& f) {
    for_each(s.size(), [&](long i) { f(static_cast<int>(i % s.rows), static_cast<int>(i / s.rows)); });
  }
  template <class T, class Term>
  static void add_row_sums(T* out, shape s, const Term& term) {  // what backend::cuda runs
    detail::add_row_sums_in_runs<ordered_cpu>(out, s, term);
  }
  template <class T, class Term>
  static void add_broadcast_sums(T* out, shape leaf, shape s, const Term& term) {  // what backend::cuda runs
    detail::add_broadcast_sums_in_runs<ordered_cpu>(out, leaf, s, term);
  }
  /// Four lanes per column, as four threads that take the columns in the same order and meet
  /// at each lane reduction (a warp's shuffles, emulated): a lane that missed its rows, wrote
  /// another lane's element or skipped a reduction would show as a wrong value or a hang.
  template <class F>
  static void for_each_column(shape s, const F& f) {
    meeting m;
    std::vector<std::thread> lanes;
    for (int l = 0; l < meeting::width; ++l)
      lanes.emplace_back([&, l] {
        for (long k = 0; k < s.cols; ++k) f(Reverse ? s.cols - 1 - k : k, thread_lanes{&m, l});
      });
    for (auto& t : lanes) t.join();
  }
  struct meeting {
    static constexpr int width = 4;
    std::barrier<> arrived{width};
    double values[width] = {};
  };
  struct thread_lanes {
    meeting* m;
    int index;
    int lane() const { return index; }
    int width() const { return meeting::width; }
    template <class T>
    T sum(T x) const {
      return combine(x, [](T a, T b) { return a + b; });
    }
    template <class T>
    T max(T x) const {
      return combine(x, [](T a, T b) { return fn::max_(a, b); });
    }
    /// Each lane posts its value, then every lane reads all four and combines them in one fixed
    /// tree; the second meeting keeps a fast lane from posting its next value too early.
    template <class T, class Op>
    T combine(T x, Op op) const {
      m->values[index] = static_cast<double>(x);  // a float or double, exactly
      m->arrived.arrive_and_wait();
      const auto v = [&](int l) { return static_cast<T>(m->values[l]); };
      const T r = op(op(v(0), v(1)), op(v(2), v(3)));
      m->arrived.arrive_and_wait();
      return r;
    }
  };
};
using reversed = ordered_cpu<true>;
using forward = ordered_cpu<false>;
static_assert(Backend<reversed>);

/// Both orders, bit for bit, and against the CPU backend within tolerance.
template <class T, class Program>
void check_orders(const char* name, const Program& program, const std::vector<Mat>& inputs) {
  INFO("op: ", std::string(name));
  const auto r = run_on<T, reversed>(program, inputs, 3), f = run_on<T, forward>(program, inputs, 3);
  const auto want = run_on<T, backend::cpu>(program, inputs, 3);
  for (std::size_t k = 0; k < r.size(); ++k) {
    CHECK(same_bits(r[k], f[k]));
    expect_near(r[k], want[k], backend_tolerance<T>, k == 0 ? "value" : "gradient of input " + std::to_string(k - 1));
  }
}

}  // namespace

TEST_CASE_TEMPLATE("concurrent code paths: every op matches the CPU backend", T, float, double) {
  check_elementwise_ops<T, backend::cpu, reversed>(13, 70);
  check_other_ops<T, backend::cpu, reversed>(29, 140);
}

TEST_CASE("concurrent code paths: float sums over long dimensions stay within 1e-6 of double") {
  check_long_sums<reversed>(1 << 13);
}

TEST_CASE("concurrent code paths: no two loop iterations add into one element (both orders agree bit for bit)") {
  const Mat a = random_matrix(13, 500, 1), col = random_matrix(13, 1, 2), row = random_matrix(1, 500, 3), one = random_matrix(1, 1, 4),
            g = positive(13, 1, 5);
  check_orders<float>("broadcast operands", [](auto&, auto in) { return eval(relu(in[0] * in[1] + in[2] * in[3])); }, {a, col, row, one});
  // Tall columns: a 1 x cols operand's shares in runs of rows (19 runs of every 19th row here).
  check_orders<float>("a 1 x cols operand over tall columns", [](auto&, auto in) { return eval(tanh(in[0] * in[1])); },
                      {random_matrix(300, 3, 9), random_matrix(1, 3, 10)});
  check_orders<float>("layer_norm", [](auto&, auto in) { return layer_norm(in[0], in[1], in[2]); }, {a, g, col});
  check_orders<float>("cross_entropy", [](auto&, auto in) { return cross_entropy(in[0], std::vector<int>(500, 4)); }, {a});
  check_orders<float>("transpose and slices",
                      [](auto&, auto in) {
                        const auto column = eval(transpose(in[1]));  // 500 x 1
                        return concat_rows({slice_rows(in[0], 2, 5), eval(transpose(column))});
                      },
                      {a, row});
  check_orders<float>("gather_cols with repeated ids", [](auto&, auto in) { return gather_cols(in[0], std::vector<int>{3, 1, 3, 3, 0, 1, 499, 3}); },
                      {a});
  // Columns shorter than the lane group: lanes with no rows still meet at every reduction.
  const Mat short_columns = random_matrix(3, 50, 6), one_row = random_matrix(1, 50, 7);
  check_orders<float>("softmax, 3 rows", [](auto&, auto in) { return softmax(in[0]); }, {short_columns});
  check_orders<float>("rms_norm, 1 row", [](auto&, auto in) { return rms_norm(in[0], in[1]); }, {one_row, positive(1, 1, 8)});
  check_orders<double>("log_softmax and cross_entropy, 3 rows",
                       [](auto&, auto in) { return eval(log_softmax(in[0]) + cross_entropy(in[0], std::vector<int>(50, 2))); },
                       {short_columns});
  check_orders<double>("sums and a scalar operand", [](auto&, auto in) { return eval(mean(in[0] * in[1]) + sum(in[0])); }, {a, one});
}

namespace {
/// Counts the waits the CUDA backend makes: copies to and from the host, synchronisations.
struct host_waits_counted : ordered_cpu<false> {
  static inline long waits = 0;
  template <class T>
  static void to_host(T* host, const T* src, long n) {
    ++waits;
    backend::cpu::to_host(host, src, n);
  }
  template <class T>
  static void from_host(T* dst, const T* host, long n) {
    ++waits;
    backend::cpu::from_host(dst, host, n);
  }
  static void synchronize() { ++waits; }
};
}  // namespace

TEST_CASE("backward queues its work without waiting on the host (the loss's seed and 1x1 adjoints are read in the loops)") {
  using B = host_waits_counted;
  Tape<float, B> tape;
  const Var<float, B> x = tape.variable(random_matrix(13, 40, 1)), gain = tape.variable(positive(13, 1, 2)),
                      bias = tape.variable(random_matrix(13, 1, 3));
  const auto h = layer_norm(x, gain, bias);
  const auto loss = eval(mean(square(softmax(h))) + 0.5 * sum(h) + cross_entropy(h, std::vector<int>(40, 3)) + mse(h, x));
  const long before = B::waits;
  tape.backward(loss);
  CHECK(B::waits == before);
  const Mat dx = tape.grad(x).cast<double>();  // and the count does see a read back
  CHECK(B::waits > before);
  CHECK(dx.norm() > 0);
}

namespace {
/// A backend that refuses its next fill_zero, as the CUDA backend refuses a thread that does not
/// hold it: the call throws before doing any work.
struct refusing_cpu : ordered_cpu<false> {
  static inline bool refuse_next = false;
  template <class T>
  static void fill_zero(T* p, long n) {
    if (std::exchange(refuse_next, false)) throw std::runtime_error("refused");
    backend::cpu::fill_zero(p, n);
  }
};
}  // namespace

TEST_CASE("a backward refused at its first backend call can be made again, with the same gradients") {
  using B = refusing_cpu;
  auto run = [](bool refuse_first) {
    Tape<double, B> tape;
    const Var<double, B> x = tape.variable(random_matrix(7, 9, 4));
    const auto loss = sum(square(tanh(x)));
    if (refuse_first) {
      const std::size_t held = tape.memory().bytes;
      B::refuse_next = true;
      CHECK_THROWS_WITH_AS(tape.backward(loss), "refused", std::runtime_error);
      CHECK(tape.memory().bytes == held);  // the loss's adjoint went back unpublished
    }
    tape.backward(loss);  // not "already back-propagated"
    return Mat(tape.grad(x));
  };
  const Mat plain = run(false), retried = run(true);
  CHECK(same_bits(retried, plain));
}
