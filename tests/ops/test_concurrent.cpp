// The code paths of concurrent backends (backend::cuda), run on the CPU: a test backend whose
// loop primitives say their iterations may run at the same time and run them in an order other
// than the CPU's (reversed, or forward), within each primitive's contract. Every op's value and
// gradients must match the CPU backend (tolerance: the sums run in another order), and the two
// orders must agree bit for bit: were two iterations to add into one element (a race on a GPU),
// the sum's rounding would depend on their order.
#include "support/backend_checks.hpp"

#include <vector>

using namespace ckpt;
using namespace ckpt::test;

namespace {

template <bool Reverse>
struct ordered_cpu : backend::cpu {
  static constexpr const char* name = Reverse ? "reversed_cpu" : "forward_cpu";
  static constexpr bool concurrent = true;
  template <class F>
  static void for_each(long n, const F& f) {
    for (long k = 0; k < n; ++k) f(Reverse ? n - 1 - k : k);
  }
  template <class F>
  static void for_each_2d(shape s, const F& f) {
    for_each(s.size(), [&](long i) { f(static_cast<int>(i % s.rows), static_cast<int>(i / s.rows)); });
  }
  template <class T, class Term>
  static void add_row_sums(T* out, shape s, const Term& term) {  // what backend::cuda runs
    detail::add_row_sums_in_runs<ordered_cpu>(out, s, term);
  }
  template <class T>
  static T* scratch(long n) {
    static std::vector<T> buffer;
    if (static_cast<long>(buffer.size()) < n) buffer.resize(static_cast<std::size_t>(n));
    return buffer.data();
  }
};
using reversed = ordered_cpu<true>;
using forward = ordered_cpu<false>;
static_assert(Backend<reversed>);

/// Both orders, bit for bit, and against the CPU backend within tolerance.
template <class T, class Program>
void check_orders(const char* name, const Program& program, const std::vector<Mat>& inputs) {
  INFO("op: ", std::string(name));
  const auto r = run_on<T, reversed>(program, inputs, 3), f = run_on<T, forward>(program, inputs, 3);
  for (std::size_t k = 0; k < r.size(); ++k) CHECK(same_bits(r[k], f[k]));
}

}  // namespace

TEST_CASE_TEMPLATE("concurrent code paths: every op matches the CPU backend", T, float, double) {
  check_elementwise_ops<T, backend::cpu, reversed>(13, 70);
  check_other_ops<T, backend::cpu, reversed>(29, 140);
}

TEST_CASE("concurrent code paths: no two loop iterations add into one element (both orders agree bit for bit)") {
  const Mat a = random_matrix(13, 500, 1), col = random_matrix(13, 1, 2), row = random_matrix(1, 500, 3), one = random_matrix(1, 1, 4),
            g = positive(13, 1, 5);
  check_orders<float>("broadcast operands", [](auto&, auto in) { return eval(relu(in[0] * in[1] + in[2] * in[3])); }, {a, col, row, one});
  check_orders<float>("layer_norm", [](auto&, auto in) { return layer_norm(in[0], in[1], in[2]); }, {a, g, col});
  check_orders<float>("cross_entropy", [](auto&, auto in) { return cross_entropy(in[0], std::vector<int>(500, 4)); }, {a});
  check_orders<float>("transpose and slices",
                      [](auto&, auto in) {
                        const auto column = eval(transpose(in[1]));  // 500 x 1
                        return concat_rows({slice_rows(in[0], 2, 5), eval(transpose(column))});
                      },
                      {a, row});
  check_orders<double>("sums and a scalar operand", [](auto&, auto in) { return eval(mean(in[0] * in[1]) + sum(in[0])); }, {a, one});
}
