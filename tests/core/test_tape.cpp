// The tape: bad input and misuse (exception type, message, and a usable tape afterwards), the
// memory counters, positions, a 4-layer MLP against a hand-written backward, 1,000 training
// steps without growth, and two tapes trained on two threads.
#include "support/gradcheck.hpp"

#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

using namespace ckpt;
using ckpt::test::close_rel;
using ckpt::test::Mat;
using ckpt::test::random_matrix;
using ckpt::test::same_bits;

using V = Var<double>;

static_assert(std::is_base_of_v<error, shape_error>);
static_assert(std::is_base_of_v<error, tape_error>);
static_assert(std::is_base_of_v<error, numeric_error>);
static_assert(std::is_base_of_v<std::runtime_error, error>);

namespace {

/// Records a small program on `tape` (after what is already there) and checks its value and
/// gradient: the tape still works.
void expect_usable(Tape<double>& tape) {
  const Mat xm = random_matrix(3, 2, 99);
  const std::size_t entries = tape.entry_count();
  const V x = tape.variable(xm);
  V loss = sum(square(x) * 0.5 + x);
  CHECK(tape.entry_count() == entries + 1);
  CHECK(loss.item() == doctest::Approx(0.5 * xm.squaredNorm() + xm.sum()).epsilon(1e-14));
  tape.backward(loss);
  CHECK(close_rel(tape.grad(x), (xm.array() + 1.0).matrix(), 1e-15));
}

/// Checks that a throwing call recorded nothing and held no memory.
struct unchanged {
  const Tape<double>& tape;
  std::size_t entries = tape.entry_count(), nodes = tape.node_count(), bytes = tape.bytes();
  bool operator()() const { return tape.entry_count() == entries && tape.node_count() == nodes && tape.bytes() == bytes; }
};

}  // namespace

// ------------------------------------------------------------------ bad input: shapes

TEST_CASE("bad input: mismatched shapes name the op and the shapes, record nothing") {
  Tape<double> tape;
  const V a = tape.variable(random_matrix(2, 3, 1));
  const V b = tape.variable(random_matrix(3, 2, 2));
  const V c = tape.variable(random_matrix(2, 4, 3));
  const V col3 = tape.variable(random_matrix(3, 1, 4));
  const V g2 = tape.variable(random_matrix(2, 1, 5));
  const V g3 = tape.variable(random_matrix(3, 1, 6));
  const V q4 = tape.variable(random_matrix(4, 3, 7)), k6 = tape.variable(random_matrix(6, 3, 8));  // attention's heads
  const V k3 = tape.variable(random_matrix(3, 3, 9)), k2 = tape.variable(random_matrix(2, 3, 10));
  const unchanged same{tape};

  SUBCASE("elementwise") {
    CHECK_THROWS_WITH_AS(eval(a + b), doctest::Contains("add: shapes 2x3 and 3x2 do not match"), shape_error);
    CHECK_THROWS_WITH_AS(eval(a * c), doctest::Contains("mul: shapes 2x3 and 2x4"), shape_error);
    CHECK_THROWS_WITH_AS(eval(a - col3), doctest::Contains("sub: shapes 2x3 and 3x1"), shape_error);
    CHECK_THROWS_WITH_AS(eval(relu(a) / b), doctest::Contains("div: shapes 2x3 and 3x2"), shape_error);
    CHECK_THROWS_WITH_AS(eval(exp(a) * 2.0 + sigmoid(b)), doctest::Contains("add: shapes 2x3 and 3x2"), shape_error);
  }
  SUBCASE("matmul") {
    CHECK_THROWS_WITH_AS(matmul(a, a), doctest::Contains("matmul: inner dimensions differ: (2x3) * (2x3)"), shape_error);
    CHECK_THROWS_WITH_AS(matmul(a, transpose(c)), doctest::Contains("matmul: inner dimensions differ: (2x3) * transpose(2x4)"),
                         shape_error);
    CHECK_THROWS_WITH_AS(matmul(transpose(b), a), doctest::Contains("matmul: inner dimensions differ: transpose(3x2) * (2x3)"),
                         shape_error);
    CHECK_THROWS_WITH_AS(matmul(transpose(a), transpose(a)), doctest::Contains("transpose(2x3) * transpose(2x3)"), shape_error);
  }
  SUBCASE("mse") {
    CHECK_THROWS_WITH_AS(mse(a, b), doctest::Contains("mse: prediction 2x3 and target 3x2 differ"), shape_error);
    CHECK_THROWS_WITH_AS(mse(a, c), doctest::Contains("mse: prediction 2x3 and target 2x4 differ"), shape_error);
  }
  SUBCASE("layer_norm and rms_norm gain and bias") {
    CHECK_THROWS_WITH_AS(layer_norm(a, g3, g2), doctest::Contains("layer_norm: gain must be 2x1 for input 2x3, got 3x1"), shape_error);
    CHECK_THROWS_WITH_AS(layer_norm(a, g2, g3), doctest::Contains("layer_norm: bias must be 2x1 for input 2x3, got 3x1"), shape_error);
    CHECK_THROWS_WITH_AS(layer_norm(a, a, g2), doctest::Contains("got 2x3"), shape_error);
    CHECK_THROWS_WITH_AS(rms_norm(b, g2), doctest::Contains("rms_norm: gain must be 3x1 for input 3x2, got 2x1"), shape_error);
  }
  SUBCASE("cross_entropy labels") {
    const std::vector<int> two = {0, 1}, four = {0, 1, 1, 0}, high = {0, 2, 1}, negative = {-1, 0, 0};
    CHECK_THROWS_WITH_AS(cross_entropy(a, two), doctest::Contains("cross_entropy: 2 labels for logits 2x3"), shape_error);
    CHECK_THROWS_WITH_AS(cross_entropy(a, four), doctest::Contains("cross_entropy: 4 labels for logits 2x3"), shape_error);
    CHECK_THROWS_WITH_AS(cross_entropy(a, high), doctest::Contains("label 2 of column 1 is outside [0, 2) for logits 2x3"),
                         shape_error);
    CHECK_THROWS_WITH_AS(cross_entropy(a, negative), doctest::Contains("label -1 of column 0 is outside [0, 2)"), shape_error);
  }
  SUBCASE("gather_cols and nn::Embedding ids") {
    CHECK_THROWS_WITH_AS(gather_cols(a, {0, 3}), doctest::Contains("gather_cols: id 3 of column 1 is outside [0, 3) for a 2x3 tensor"),
                         shape_error);
    CHECK_THROWS_WITH_AS(gather_cols(a * 2.0, {-1}), doctest::Contains("gather_cols: id -1 of column 0 is outside [0, 3)"), shape_error);
    nn::Embedding<double> emb(5, 2);
    CHECK_THROWS_WITH_AS(emb(tape, {4, 5}), doctest::Contains("embedding: id 5 of column 1 is outside [0, 5) for a 2x5 tensor"),
                         shape_error);
  }
  SUBCASE("attention heads and sequences") {
    CHECK_THROWS_WITH_AS(attention_scores(a, c, 1, 1, 1.0), doctest::Contains("attention_scores: q 2x3 and k 2x4 differ"), shape_error);
    CHECK_THROWS_WITH_AS(attention_scores(a, a, 3, 1, 1.0), doctest::Contains("attention_scores: q 2x3 has 2 rows, which do not split into 3 heads"),
                         shape_error);
    CHECK_THROWS_WITH_AS(attention_scores(a, a * 2.0, 1, 2, 1.0),
                         doctest::Contains("attention_scores: q 2x3 has 3 columns, which are not whole sequences of 2"), shape_error);
    CHECK_THROWS_WITH_AS(attention_scores(a, a, 0, 3, 1.0), doctest::Contains("attention_scores: heads (0) and seq_len (3) must be positive"),
                         shape_error);
    CHECK_THROWS_WITH_AS(attention_output(a, relu(a), 1, 3),
                         doctest::Contains("attention_output: weights 2x3 do not fit v 2x3 with 1 heads and sequences of 3 (expected 3x3)"),
                         shape_error);
    CHECK_THROWS_WITH_AS(attention(a, a, a, 3, 1), doctest::Contains("attention: q 2x3 has 2 rows, which do not split into 3 heads"), shape_error);
    // A bad v is found before the scores and the softmax are recorded.
    CHECK_THROWS_WITH_AS(attention(a, a, b, 1, 3), doctest::Contains("attention: v 3x2 has 2 columns, which are not whole sequences of 3"),
                         shape_error);
    CHECK_THROWS_WITH_AS(attention(c, c, a, 1, 1), doctest::Contains("attention: v 2x3 and q 2x4 have different numbers of tokens"),
                         shape_error);
    CHECK_THROWS_WITH_AS(attention(a, a * 2.0, col3 * 1.0, 2, 1), doctest::Contains("attention: v 3x1 has 3 rows, which do not split into 2 heads"),
                         shape_error);
    CHECK_THROWS_WITH_AS(attention(a, c, a, 1, 1), doctest::Contains("attention: k 2x4 and q 2x3 have different numbers of tokens"),
                         shape_error);
    // Grouped-query attention: k's rows must be whole heads of q's width, dividing q's heads.
    CHECK_THROWS_WITH_AS(attention(q4, b * 1.0, b, 2, 1), doctest::Contains("attention: k 3x2 and q 4x3 have different numbers of tokens"),
                         shape_error);
    CHECK_THROWS_WITH_AS(attention(q4, k3 * 1.0, b, 2, 1),  // 3 rows: not whole heads of 2
                         doctest::Contains("attention: k 3x3 must have q's 4 rows, or for grouped-query attention a number of heads of 2 "
                                           "rows (q's) that divides q's 2 heads"),
                         shape_error);
    CHECK_THROWS_WITH_AS(attention(q4, k6, q4, 2, 1),  // 3 heads of k for 2 of q
                         doctest::Contains("attention: k 6x3 must have q's 4 rows, or for grouped-query attention"), shape_error);
    CHECK_THROWS_WITH_AS(attention(q4, k2, b * 1.0, 4, 1),  // 2 key/value heads of 1 row for 4 query heads: v splits into 2
                         doctest::Contains("attention: v 3x2 has 3 rows, which do not split into the 2 key/value heads of k 2x3"),
                         shape_error);
  }
  SUBCASE("slice_rows out of range") {
    CHECK_THROWS_WITH_AS(slice_rows(b, 2, 2), doctest::Contains("slice_rows: rows [2, 4) are outside a 3x2 tensor"), shape_error);
    CHECK_THROWS_WITH_AS(slice_rows(b, -1, 2), doctest::Contains("slice_rows: rows [-1, 1) are outside a 3x2 tensor"), shape_error);
    CHECK_THROWS_WITH_AS(slice_rows(b, 1, -1), doctest::Contains("slice_rows: rows [1, 0)"), shape_error);
    CHECK_THROWS_WITH_AS(slice_rows(b, 3, 1), doctest::Contains("rows [3, 4) are outside a 3x2"), shape_error);
  }
  SUBCASE("slice_cols out of range, concat_cols row mismatch") {
    CHECK_THROWS_WITH_AS(slice_cols(a, 2, 2), doctest::Contains("slice_cols: columns [2, 4) are outside a 2x3 tensor"), shape_error);
    CHECK_THROWS_WITH_AS(slice_cols(a, -1, 1), doctest::Contains("slice_cols: columns [-1, 0)"), shape_error);
    CHECK_THROWS_WITH_AS(slice_cols(a * 2.0, 0, 4), doctest::Contains("columns [0, 4) are outside a 2x3"), shape_error);
    CHECK_THROWS_WITH_AS(concat_cols({a, b}), doctest::Contains("concat_cols: row counts differ: 2x3 3x2"), shape_error);
    CHECK_THROWS_WITH_AS(concat_cols(std::vector<V>{}), doctest::Contains("concat_cols: no tensors"), shape_error);
  }
  SUBCASE("concat_rows column mismatch") {
    CHECK_THROWS_WITH_AS(concat_rows({a, c}), doctest::Contains("concat_rows: column counts differ: 2x3 2x4"), shape_error);
    CHECK_THROWS_WITH_AS(concat_rows({a, a, b}), doctest::Contains("concat_rows: column counts differ: 2x3 2x3 3x2"), shape_error);
    CHECK_THROWS_WITH_AS(concat_rows(std::vector<V>{}), doctest::Contains("concat_rows: no tensors"), shape_error);
  }
  SUBCASE("expression operands are not recorded when the shapes are wrong") {
    CHECK_THROWS_WITH_AS(matmul(relu(a), a * 2.0), doctest::Contains("matmul: inner dimensions differ: (2x3) * (2x3)"), shape_error);
    CHECK_THROWS_WITH_AS(matmul(transpose(exp(b)), a + 1.0), doctest::Contains("transpose(3x2) * (2x3)"), shape_error);
    CHECK_THROWS_WITH_AS(layer_norm(relu(a), g3 * 1.0, g2 + 0.0), doctest::Contains("layer_norm: gain must be 2x1 for input 2x3, got 3x1"),
                         shape_error);
    CHECK_THROWS_WITH_AS(layer_norm(relu(a), g2 * 1.0, g3 + 0.0), doctest::Contains("layer_norm: bias must be 2x1"), shape_error);
    CHECK_THROWS_WITH_AS(rms_norm(exp(b), g2 * 1.0), doctest::Contains("rms_norm: gain must be 3x1 for input 3x2, got 2x1"), shape_error);
    const std::vector<int> two = {0, 1}, high = {0, 2, 1};
    CHECK_THROWS_WITH_AS(cross_entropy(a * 2.0, two), doctest::Contains("cross_entropy: 2 labels for logits 2x3"), shape_error);
    CHECK_THROWS_WITH_AS(cross_entropy(a * 2.0, high), doctest::Contains("label 2 of column 1"), shape_error);
    CHECK_THROWS_WITH_AS(slice_rows(b + 1.0, 2, 2), doctest::Contains("slice_rows: rows [2, 4) are outside a 3x2 tensor"), shape_error);
  }
  CHECK(same());
  expect_usable(tape);
}

TEST_CASE("bad input: backward on a non-1x1 value") {
  Tape<double> tape;
  const V a = tape.variable(random_matrix(2, 3, 1));
  const V b = tape.variable(random_matrix(3, 2, 2));
  V y = relu(a);
  const unchanged same{tape};
  CHECK_THROWS_WITH_AS(tape.backward(y), doctest::Contains("backward: the loss must be 1x1, got 2x3 (from op 'relu')"), shape_error);
  CHECK_THROWS_WITH_AS(tape.backward(b), doctest::Contains("got 3x2 (from op 'variable')"), shape_error);
  CHECK_THROWS_WITH_AS(y.item(), doctest::Contains("item: the Var is 2x3, not 1x1"), shape_error);
  CHECK(same());
  // Nothing was swept: the same recording still back-propagates from a proper loss.
  V loss = sum(y * 2.0);
  tape.backward(loss);
  CHECK(same_bits(tape.grad(a), (a.value().array() > 0.0).cast<double>().matrix() * 2.0));
  tape.reset();
  expect_usable(tape);
}

// ------------------------------------------------------------------ misuse of the tape

TEST_CASE("misuse: a Var from another tape, in an op and in backward") {
  Tape<double> t1, t2;
  const V x1 = t1.variable(random_matrix(3, 3, 1));
  const V x2 = t2.variable(random_matrix(3, 3, 2));
  const V g1 = t1.variable(random_matrix(3, 1, 3));
  const V g2 = t2.variable(random_matrix(3, 1, 4));
  V l1 = sum(x1);
  const unchanged same1{t1}, same2{t2};
  CHECK_THROWS_WITH_AS(eval(x1 + x2), doctest::Contains("add: the operands belong to different tapes"), tape_error);
  CHECK_THROWS_WITH_AS(eval(relu(x1) * exp(x2)), doctest::Contains("mul: the operands belong to different tapes"), tape_error);
  CHECK_THROWS_WITH_AS(matmul(x1, x2), doctest::Contains("matmul: the operands belong to different tapes"), tape_error);
  CHECK_THROWS_WITH_AS(matmul(transpose(x1), x2), doctest::Contains("matmul: the operands belong to different tapes"), tape_error);
  CHECK_THROWS_WITH_AS(layer_norm(x1, g2, g1), doctest::Contains("layer_norm: the operands belong to different tapes"), tape_error);
  CHECK_THROWS_WITH_AS(rms_norm(x1, g2), doctest::Contains("rms_norm: the operands belong to different tapes"), tape_error);
  CHECK_THROWS_WITH_AS(mse(x1, x2), doctest::Contains("the operands belong to different tapes"), tape_error);
  CHECK_THROWS_WITH_AS(concat_rows({x1, x2}), doctest::Contains("concat_rows: the operands belong to different tapes"), tape_error);
  CHECK_THROWS_WITH_AS(concat_cols({x1, x2}), doctest::Contains("concat_cols: the operands belong to different tapes"), tape_error);
  // attention's third operand (v) from the other tape, after q and k from the same one.
  CHECK_THROWS_WITH_AS(attention(x1, x1, x2, 1, 3), doctest::Contains("attention: the operands belong to different tapes"), tape_error);
  CHECK_THROWS_WITH_AS(t2.backward(l1), doctest::Contains("backward: the Var belongs to another tape"), tape_error);
  CHECK_THROWS_WITH_AS(t2.grad(x1), doctest::Contains("grad: the Var belongs to another tape"), tape_error);
  CHECK_THROWS_WITH_AS(t2.retain(x1), doctest::Contains("retain: the Var belongs to another tape"), tape_error);
  CHECK(same1());
  CHECK(same2());
  // Both tapes still work, and t1's own recording still back-propagates.
  t1.backward(l1);
  CHECK(same_bits(t1.grad(x1), Mat::Ones(3, 3)));
  t1.reset();
  expect_usable(t1);
  expect_usable(t2);
}

TEST_CASE("misuse: a Var from before reset() or from a rolled-back position") {
  Tape<double> tape;
  const Mat xm = random_matrix(2, 2, 1);
  const V old = tape.variable(xm);
  V old_loss = sum(old);
  auto pending = old * 2.0;  // an expression built before the reset, recorded after it
  tape.reset();
  CHECK_THROWS_WITH_AS(relu(old), doctest::Contains("relu: the Var is from a finished recording"), tape_error);
  CHECK_THROWS_WITH_AS(tape.backward(old_loss), doctest::Contains("backward: the Var is from a finished recording"), tape_error);
  CHECK_THROWS_WITH_AS(old.value(), doctest::Contains("value: the Var is from a finished recording"), tape_error);
  // Once new nodes occupy the old indices, the epoch still tells them apart.
  const V fresh = tape.variable(xm);
  V fresh2 = sum(fresh);
  REQUIRE(fresh.index() == old.index());
  CHECK_THROWS_WITH_AS(eval(pending), doctest::Contains("mul: the Var is from a finished recording"), tape_error);
  CHECK_THROWS_WITH_AS(matmul(old, fresh), doctest::Contains("matmul: the Var is from a finished recording"), tape_error);
  CHECK_THROWS_WITH_AS(eval(fresh + old), doctest::Contains("add: the Var is from a finished recording"), tape_error);
  CHECK_THROWS_WITH_AS(tape.grad(old), doctest::Contains("grad: the Var is from a finished recording"), tape_error);
  CHECK_THROWS_WITH_AS(old.dims(), doctest::Contains("dims: the Var is from a finished recording"), tape_error);
  CHECK_THROWS_WITH_AS(tape.backward(old_loss), doctest::Contains("finished recording"), tape_error);
  CHECK(fresh2.item() == doctest::Approx(xm.sum()));

  // reset_to(position): Vars made after the position are invalid, those before stay valid.
  const ckpt::position p = tape.position();
  const std::size_t bytes = tape.bytes();
  V later = relu(fresh);
  V later2 = exp(later);
  CHECK(tape.bytes() > bytes);
  tape.reset_to(p);
  CHECK(tape.bytes() == bytes);
  CHECK(tape.node_count() == p.nodes);
  CHECK(tape.entry_count() == p.entries);
  CHECK_THROWS_WITH_AS(later.value(), doctest::Contains("finished recording"), tape_error);
  CHECK_THROWS_WITH_AS(eval(later2 * 2.0), doctest::Contains("mul: the Var is from a finished recording"), tape_error);
  CHECK(same_bits(fresh.value(), xm));
  V loss = sum(square(fresh));
  tape.backward(loss);
  CHECK(close_rel(tape.grad(fresh), 2.0 * xm, 1e-15));
  tape.reset();
  expect_usable(tape);
}

TEST_CASE("misuse: a second backward over the same recording") {
  Tape<double> tape;
  const Mat xm = random_matrix(3, 2, 1);
  const V x = tape.variable(xm);
  V loss = sum(square(x));
  tape.backward(loss);
  const Mat g = tape.grad(x);
  CHECK_THROWS_WITH_AS(tape.backward(loss), doctest::Contains("backward: this recording was already back-propagated"), tape_error);
  // Recording more on the swept tape does not make a second sweep legal.
  V loss2 = sum(x);
  CHECK_THROWS_WITH_AS(tape.backward(loss2), doctest::Contains("already back-propagated; call reset()"), tape_error);
  // The failed call did not touch the gradient, and after reset() the tape works again.
  CHECK(same_bits(tape.grad(x), g));
  CHECK(close_rel(g, 2.0 * xm, 1e-15));
  tape.reset();
  expect_usable(tape);
}

TEST_CASE("misuse: NaN or Inf in the loss with set_check_finite names the first node") {
  Tape<double> tape;
  Mat xm(3, 1);
  xm << 1.0, -1.0, 2.0;
  SUBCASE("log of a negative number") {
    tape.set_check_finite(true);
    const V x = tape.variable(xm);
    V scaled = x * 1.0;          // node 1: finite
    V l = log(scaled);           // node 2: NaN at element 1
    V loss = sum(l * 2.0 + 1.0); // NaN propagates, but the first producer is the log
    CHECK(std::isnan(loss.item()));
    CHECK_THROWS_WITH_AS(tape.backward(loss),
                         doctest::Contains("the first non-finite value came from node #2 (op 'log', 3x1) at element 1"), numeric_error);
    // The recording is as it was: a finite loss on the same tape back-propagates.
    expect_usable(tape);
  }
  SUBCASE("exp overflowing to Inf") {
    tape.set_check_finite(true);
    Mat big = xm;
    big(2) = 1000.0;
    const V x = tape.variable(big);
    V e = exp(x);
    V loss = mean(e);
    CHECK(std::isinf(loss.item()));
    CHECK_THROWS_WITH_AS(tape.backward(loss), doctest::Contains("came from node #1 (op 'exp', 3x1) at element 2"), numeric_error);
    CHECK_THROWS_AS(tape.backward(loss), ckpt::error);
    // Fused into the reduction, the exp has no node of its own: the reduction is named.
    V fused = mean(exp(x));
    CHECK_THROWS_WITH_AS(tape.backward(fused), doctest::Contains("the loss is inf; the first non-finite value came from node #1"),
                         numeric_error);
    expect_usable(tape);
  }
  SUBCASE("a non-finite input leaf") {
    tape.set_check_finite(true);
    Mat bad = xm;
    bad(0) = std::numeric_limits<double>::quiet_NaN();
    const V x = tape.constant(bad);
    const V w = tape.variable(xm);
    V loss = sum(x * w);
    CHECK_THROWS_WITH_AS(tape.backward(loss), doctest::Contains("node #0 (op 'constant', 3x1) at element 0"), numeric_error);
    expect_usable(tape);
  }
  SUBCASE("off by default: the sweep runs and propagates the NaN") {
    const V x = tape.variable(xm);
    V loss = sum(log(x));
    CHECK_NOTHROW(tape.backward(loss));
    const Mat g = tape.grad(x);
    CHECK(g(0) == 1.0);
    CHECK(g(1) == -1.0);  // d log(x) / dx = 1 / x is finite even where log(x) is not
    tape.reset();
    expect_usable(tape);
  }
}

TEST_CASE("misuse: reading a value released by backward") {
  Tape<double> tape;
  const Mat xm = random_matrix(2, 3, 1);
  const V x = tape.variable(xm);
  V h = relu(x);
  V kept = exp(h);
  tape.retain(kept);
  V loss = sum(kept);
  tape.backward(loss);
  CHECK_THROWS_WITH_AS(h.value(), doctest::Contains("value: the value of Var #1 ('relu', 2x3) was released by backward"), tape_error);
  CHECK_THROWS_WITH_AS(h.value(), doctest::Contains("call tape.retain(v) before backward"), tape_error);
  CHECK_THROWS_WITH_AS(tape.grad(h), doctest::Contains("grad: the value of Var #1"), tape_error);
  CHECK_THROWS_WITH_AS(eval(h * 2.0), doctest::Contains("mul: the value of Var #1 ('relu', 2x3) was released"), tape_error);
  CHECK_THROWS_WITH_AS(matmul(h, transpose(x)), doctest::Contains("matmul: the value of Var #1"), tape_error);
  // The loss, the leaves and retained Vars stay readable.
  CHECK(loss.item() == doctest::Approx(xm.cwiseMax(0.0).array().exp().sum()));
  CHECK(same_bits(x.value(), xm));
  CHECK(close_rel(kept.value(), xm.cwiseMax(0.0).array().exp().matrix(), 1e-15));
  CHECK(same_bits(tape.grad(kept), Mat::Ones(2, 3)));
  tape.reset();
  expect_usable(tape);
}

TEST_CASE("misuse: an empty (default-constructed) Var") {
  Tape<double> tape;
  const V x = tape.variable(random_matrix(2, 2, 1));
  const V e;
  CHECK(e.empty());
  CHECK_FALSE(x.empty());
  const unchanged same{tape};
  CHECK_THROWS_WITH_AS(tape.backward(e), doctest::Contains("backward: the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(tape.grad(e), doctest::Contains("grad: the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(tape.retain(e), doctest::Contains("retain: the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(e.value(), doctest::Contains("value: the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(e.item(), doctest::Contains("the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(e.dims(), doctest::Contains("dims: the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(e.rows(), doctest::Contains("the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(e.requires_grad(), doctest::Contains("requires_grad: the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(eval(relu(e)), doctest::Contains("relu: the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(eval(x + e), doctest::Contains("add: the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(matmul(e, x), doctest::Contains("matmul: the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(sum(e), doctest::Contains("sum: the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(softmax(e), doctest::Contains("softmax: the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(slice_rows(e, 0, 1), doctest::Contains("slice_rows: the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(concat_rows({x, e}), doctest::Contains("concat_rows: the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(slice_cols(e, 0, 1), doctest::Contains("slice_cols: the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(concat_cols({e, x}), doctest::Contains("concat_cols: the Var is empty"), tape_error);
  CHECK_THROWS_WITH_AS(dropout(e, 0.5), doctest::Contains("dropout: the Var is empty"), tape_error);
  CHECK(same());
  expect_usable(tape);
}

TEST_CASE("misuse: other bad arguments") {
  Tape<double> tape;
  const V x = tape.variable(random_matrix(2, 2, 1));
  Parameter<double> p(random_matrix(2, 2, 2)), q(random_matrix(2, 2, 3));
  const unchanged same{tape};
  CHECK_THROWS_WITH_AS(dropout(x, 1.0), doctest::Contains("dropout: p must be in [0, 1), got 1"), ckpt::error);
  CHECK_THROWS_WITH_AS(dropout(x, -0.1), doctest::Contains("dropout: p must be in [0, 1), got -0.1"), ckpt::error);
  CHECK_THROWS_WITH_AS(eval(p * 2.0), doctest::Contains("mul: the expression has no Var operand"), tape_error);
  CHECK_THROWS_WITH_AS(matmul(p, q), doctest::Contains("matmul: no operand is on a tape"), tape_error);
  CHECK_THROWS_WITH_AS(sum(p), doctest::Contains("sum: the operand is not on a tape"), tape_error);
  CHECK_THROWS_WITH_AS(softmax(p), doctest::Contains("softmax: the operand is not on a tape"), tape_error);
  CHECK_THROWS_WITH_AS(gather_cols(p, {0}), doctest::Contains("gather_cols: the operand is not on a tape; bring a parameter onto one with tape.param(p)"),
                       tape_error);
  CHECK_THROWS_WITH_AS(static_cast<void>(V(transpose(p))), doctest::Contains("transpose: a parameter is not on a tape"), tape_error);
  CHECK(same());
  // Every one of them is a ckpt::error.
  CHECK_THROWS_AS(eval(x + tape.variable(random_matrix(3, 3, 4))), ckpt::error);
  CHECK_THROWS_AS(V().value(), ckpt::error);
  expect_usable(tape);
}

// ------------------------------------------------------------------ memory counters

TEST_CASE("memory: bytes count every buffer; backward releases activations; peak covers the forward") {
  auto size = [](shape s) { return buffer_pool<backend::cpu>::rounded(Tape<double>::bytes_of(s)); };
  const shape sx{4, 8}, sg{4, 1}, one{1, 1};
  const Mat xm = random_matrix(4, 8, 1), tm = random_matrix(4, 8, 2), gm = random_matrix(4, 1, 3, 0.5, 1.5), bm = random_matrix(4, 1, 4);
  Tape<double> tape;
  CHECK(tape.bytes() == 0);
  CHECK(tape.peak_bytes() == 0);
  const V x = tape.variable(xm);
  const V t = tape.constant(tm);
  const V g = tape.constant(gm);
  const V b = tape.constant(bm);
  const std::size_t leaves = 2 * size(sx) + 2 * size(sg);
  CHECK(tape.bytes() == leaves);
  Parameter<double> unused(random_matrix(8, 8, 5));
  const V pv = tape.param(unused);  // a parameter's buffers live outside the tape
  CHECK(tape.bytes() == leaves);
  (void)pv;

  SUBCASE("without retain") {
    V h = relu(x);
    V n = layer_norm(h, g, b);  // output and a 2 x cols statistics buffer
    V loss = mse(n, t);
    const std::size_t forward = leaves + size(sx) /*h*/ + size({2, 8}) /*stats*/ + size(sx) /*n*/ + size(one) /*loss*/;
    CHECK(tape.bytes() == forward);
    CHECK(tape.peak_bytes() == forward);
    tape.backward(loss);
    // Left: the leaves, x's gradient, and the loss's value and adjoint.
    CHECK(tape.bytes() == leaves + size(sx) + 2 * size(one));
    // The peak covers the whole forward plus at least the loss's and n's adjoints, and at most
    // every adjoint at once.
    CHECK(tape.peak_bytes() >= forward + size(one) + size(sx));
    CHECK(tape.peak_bytes() <= forward + size(one) + 3 * size(sx));
    CHECK(std::isfinite(loss.item()));  // the loss stays readable
  }
  SUBCASE("retain(v) keeps a value and its gradient readable after backward") {
    V h = relu(x);
    tape.retain(h);
    V loss = sum(square(h));
    const std::size_t forward = leaves + size(sx) + size(one);
    CHECK(tape.bytes() == forward);
    tape.backward(loss);
    CHECK(tape.bytes() == leaves + size(sx) /*x adj*/ + 2 * size(sx) /*h value, adjoint*/ + 2 * size(one));
    const Mat hr = xm.cwiseMax(0.0);
    CHECK(same_bits(h.value(), hr));
    CHECK(close_rel(tape.grad(h), 2.0 * hr, 1e-15));
    CHECK(close_rel(tape.grad(x), 2.0 * hr, 1e-15));
  }
  const std::size_t peak = tape.peak_bytes();
  tape.reset();
  CHECK(tape.bytes() == 0);
  CHECK(tape.peak_bytes() == 0);
  // Released buffers stay cached in the pool until trim().
  CHECK(tape.memory().reserved_bytes >= peak);
  tape.trim();
  CHECK(tape.memory().reserved_bytes == 0);
  expect_usable(tape);
}

TEST_CASE("positions: reset_to and backward_to a position") {
  const Mat xm = random_matrix(3, 4, 1);
  Tape<double> tape;
  const V x = tape.variable(xm);
  const ckpt::position p = tape.position();
  const std::size_t bytes = tape.bytes();
  V y = sum(square(x));
  tape.adjoint_of(y.index())[0] = 1.0;  // the caller seeds the adjoints
  tape.backward_to(p);
  CHECK(close_rel(tape.grad(x), 2.0 * xm, 1e-15));
  tape.reset_to(p);
  CHECK(tape.node_count() == p.nodes);
  CHECK(tape.entry_count() == p.entries);
  // What came after p is gone; x (before p) keeps the adjoint the sweep gave it.
  CHECK(tape.bytes() == bytes + buffer_pool<backend::cpu>::rounded(Tape<double>::bytes_of(x.dims())));
  // A second segment swept down to the same position adds into the same adjoint.
  V z = sum(x * 3.0);
  tape.adjoint_of(z.index())[0] = 1.0;
  tape.backward_to(p);
  CHECK(close_rel(tape.grad(x), (2.0 * xm.array() + 3.0).matrix(), 1e-15));
  tape.reset_to(p);
  // After the segments, the recording still supports a full backward.
  V loss = mean(x);
  tape.backward(loss);
  CHECK(close_rel(tape.grad(x), (2.0 * xm.array() + 3.0 + 1.0 / 12.0).matrix(), 1e-15));
}

TEST_CASE("arena: records cross chunks and records larger than a chunk (tests use 256-byte chunks)") {
  const Mat xm = random_matrix(3, 2, 1);
  Tape<double> tape;
  for (int step = 0; step < 3; ++step) {
    CAPTURE(step);
    tape.reset();
    const V x = tape.variable(xm);
    std::vector<V> parts(40, x);  // 40 operand records: larger than a chunk
    const Mat w = random_matrix(120, 2, 2);
    V big;
    if (step == 2) big = concat_rows(parts);  // before the chain this time
    V y = x;
    double dy = 1.0;
    for (int i = 0; i < 60; ++i) {
      y = y * 0.9 + x * 0.2;
      dy = dy * 0.9 + 0.2;
    }
    if (step == 1) big = concat_rows(parts);  // after it: the chunk that follows is too small
    Mat expected = Mat::Constant(3, 2, dy);
    V loss = sum(y);
    if (!big.empty()) {
      loss = loss + sum(big * tape.constant(w));
      for (int k = 0; k < 40; ++k) expected += w.middleRows(3 * k, 3);
    }
    tape.backward(loss);
    CHECK(close_rel(tape.grad(x), expected, 1e-13));
  }
}

// ------------------------------------------------------------------ a 4-layer MLP by hand

namespace {

/// Parameters W_i (out x in) and b_i (out x 1); relu on hidden layers, the last one linear.
template <class T>
struct mlp {
  std::vector<Parameter<T>> W, b;

  mlp(const std::vector<int>& sizes, std::uint64_t seed) {
    W.reserve(sizes.size());
    b.reserve(sizes.size());
    for (std::size_t i = 0; i + 1 < sizes.size(); ++i) {
      const double s = 1.5 / std::sqrt(static_cast<double>(sizes[i]));
      W.emplace_back(random_matrix(sizes[i + 1], sizes[i], seed + 2 * i, -s, s));
      b.emplace_back(random_matrix(sizes[i + 1], 1, seed + 2 * i + 1, -0.2, 0.2));
    }
  }
  std::size_t layers() const { return W.size(); }

  Var<T> forward(Var<T> x) {
    for (std::size_t i = 0; i < layers(); ++i) {
      Var<T> h = matmul(W[i], x);
      if (i + 1 < layers())
        x = relu(h + b[i]);
      else
        x = h + b[i];
    }
    return x;
  }

  std::vector<Parameter<T>*> parameters() {
    std::vector<Parameter<T>*> ps;
    for (std::size_t i = 0; i < layers(); ++i) {
      ps.push_back(&W[i]);
      ps.push_back(&b[i]);
    }
    return ps;
  }
};

struct hand_gradients {
  double loss = 0;
  Mat dx;
  std::vector<Mat> dW, db;
};

/// The MLP's forward and backward written out by hand with the same arithmetic, in the same
/// order, as the tape's: products through the backend's GEMM (beta 1 into zeroed buffers, as
/// adjoints are), elementwise loops column by column, mse in 8 partial sums.
hand_gradients hand_mse(mlp<double>& net, const Mat& X, const Mat& Y) {
  using cpu = backend::cpu;
  const std::size_t L = net.layers();
  const int n = static_cast<int>(X.cols());
  std::vector<Mat> A{X}, Z;
  for (std::size_t i = 0; i < L; ++i) {
    const Mat W = net.W[i].value(), b = net.b[i].value();
    const int m = static_cast<int>(W.rows()), k = static_cast<int>(W.cols());
    Mat H(m, n);
    cpu::gemm(false, false, m, n, k, 1.0, W.data(), m, A[i].data(), k, 0.0, H.data(), m);
    Mat z(m, n), a(m, n);
    for (int c = 0; c < n; ++c)
      for (int r = 0; r < m; ++r) {
        z(r, c) = H(r, c) + b(r);
        a(r, c) = i + 1 < L ? (z(r, c) > 0.0 ? z(r, c) : 0.0) : z(r, c);
      }
    Z.push_back(z);
    A.push_back(a);
  }
  hand_gradients out;
  const Mat& P = A[L];
  // mse's additions: element i into partial sum i mod 8, then the 8 partial sums in order.
  double part[8] = {};
  for (long i = 0; i < P.size(); ++i) part[i % 8] += (P(i) - Y(i)) * (P(i) - Y(i));
  double acc = 0;
  for (const double p : part) acc += p;
  const double scale = 1.0 / static_cast<double>(P.size());
  out.loss = acc * scale;
  Mat G = Mat::Zero(P.rows(), n);
  for (long i = 0; i < P.size(); ++i) G(i) += (scale * (2.0 * (P(i) - Y(i)))) * 1.0;

  out.dW.resize(L);
  out.db.resize(L);
  for (std::size_t i = L; i-- > 0;) {
    const Mat W = net.W[i].value();
    const int m = static_cast<int>(W.rows()), k = static_cast<int>(W.cols());
    Mat dH = Mat::Zero(m, n), db = Mat::Zero(m, 1);
    for (int c = 0; c < n; ++c)
      for (int r = 0; r < m; ++r) {
        const double g = i + 1 < L ? G(r, c) * (Z[i](r, c) > 0.0 ? 1.0 : 0.0) : G(r, c);
        dH(r, c) += g * 1.0;
        db(r) += g * 1.0;
      }
    Mat dW = Mat::Zero(m, k), dA = Mat::Zero(k, n);
    cpu::gemm(false, true, m, k, n, 1.0, dH.data(), m, A[i].data(), k, 1.0, dW.data(), m);
    cpu::gemm(true, false, k, n, m, 1.0, W.data(), m, dH.data(), m, 1.0, dA.data(), k);
    out.dW[i] = dW;
    out.db[i] = db;
    G = dA;
  }
  out.dx = G;
  return out;
}

/// The same network with a cross-entropy loss, differentiated by hand in plain Eigen
/// (products and reductions in Eigen's own order).
hand_gradients hand_cross_entropy(mlp<double>& net, const Mat& X, const std::vector<int>& labels) {
  const std::size_t L = net.layers();
  const int n = static_cast<int>(X.cols());
  std::vector<Mat> A{X}, Z;
  for (std::size_t i = 0; i < L; ++i) {
    Z.push_back(net.W[i].value() * A[i] + net.b[i].value().replicate(1, n));
    A.push_back(i + 1 < L ? Mat(Z[i].cwiseMax(0.0)) : Z[i]);
  }
  hand_gradients out;
  Mat G = A[L];
  for (int j = 0; j < n; ++j) {
    const double mx = G.col(j).maxCoeff();
    const double lse = mx + std::log((G.col(j).array() - mx).exp().sum());
    out.loss += lse - G(labels[static_cast<std::size_t>(j)], j);
    G.col(j) = (G.col(j).array() - lse).exp().matrix();
    G(labels[static_cast<std::size_t>(j)], j) -= 1.0;
  }
  out.loss /= n;
  G /= n;
  out.dW.resize(L);
  out.db.resize(L);
  for (std::size_t i = L; i-- > 0;) {
    const Mat dZ = i + 1 < L ? Mat(G.cwiseProduct((Z[i].array() > 0.0).cast<double>().matrix())) : G;
    out.db[i] = dZ.rowwise().sum();
    out.dW[i] = dZ * A[i].transpose();
    G = net.W[i].value().transpose() * dZ;
  }
  out.dx = G;
  return out;
}

}  // namespace

TEST_CASE("MLP: 4 layers with mse, gradients bit for bit equal to a hand-written backward") {
  for (const int batch : {7, 1}) {
    CAPTURE(batch);
    mlp<double> net({6, 16, 12, 8, 5}, 10);
    const Mat X = random_matrix(6, batch, 1), Y = random_matrix(5, batch, 2);
    Tape<double> tape;
    const V x = tape.variable(X);
    V loss = mse(net.forward(x), tape.constant(Y));
    tape.backward(loss);
    const hand_gradients hand = hand_mse(net, X, Y);
    CHECK(loss.item() == hand.loss);
    CHECK(same_bits(tape.grad(x), hand.dx));
    for (std::size_t i = 0; i < net.layers(); ++i) {
      CAPTURE(i);
      CHECK(hand.dW[i].norm() > 0);
      CHECK(same_bits(net.W[i].grad(), hand.dW[i]));
      CHECK(same_bits(net.b[i].grad(), hand.db[i]));
    }
  }
}

TEST_CASE("MLP: 4 layers with cross-entropy, gradients within 1e-12 of a plain Eigen backward") {
  for (const int batch : {9, 1}) {
    CAPTURE(batch);
    mlp<double> net({7, 20, 16, 12, 4}, 20);
    const Mat X = random_matrix(7, batch, 3);
    std::vector<int> labels;
    for (int j = 0; j < batch; ++j) labels.push_back((j * 3 + 1) % 4);
    Tape<double> tape;
    const V x = tape.variable(X);
    V loss = cross_entropy(net.forward(x), labels);
    tape.backward(loss);
    const hand_gradients hand = hand_cross_entropy(net, X, labels);
    CHECK(loss.item() == doctest::Approx(hand.loss).epsilon(1e-12));
    CHECK(close_rel(tape.grad(x), hand.dx, 1e-12));
    for (std::size_t i = 0; i < net.layers(); ++i) {
      CAPTURE(i);
      CHECK(hand.dW[i].norm() > 0);
      CHECK(close_rel(net.W[i].grad(), hand.dW[i], 1e-12));
      CHECK(close_rel(net.b[i].grad(), hand.db[i], 1e-12));
    }
  }
}

TEST_CASE("MLP: a float tape agrees with the double one") {
  mlp<double> nd({6, 16, 12, 8, 5}, 30);
  mlp<float> nf({6, 16, 12, 8, 5}, 30);
  const Mat X = random_matrix(6, 4, 1), Y = random_matrix(5, 4, 2);
  Tape<double> td;
  Var<double> ld = mse(nd.forward(td.constant(X)), td.constant(Y));
  td.backward(ld);
  Tape<float> tf;
  Var<float> lf = mse(nf.forward(tf.constant(X)), tf.constant(Y));
  tf.backward(lf);
  CHECK(static_cast<double>(lf.item()) == doctest::Approx(ld.item()).epsilon(1e-5));
  for (std::size_t i = 0; i < nd.layers(); ++i) {
    CAPTURE(i);
    CHECK(close_rel(nf.W[i].grad().cast<double>(), nd.W[i].grad(), 1e-4));
    CHECK(close_rel(nf.b[i].grad().cast<double>(), nd.b[i].grad(), 1e-4));
  }
}

// ------------------------------------------------------------------ training loops

namespace {

/// An MLP with a layer norm and dropout after the first hidden layer, trained by SGD on a
/// cross-entropy loss. Everything it computes comes from its seed.
struct trainer {
  mlp<double> net;
  Parameter<double> gain, bias;
  Mat X;
  std::vector<int> labels;

  explicit trainer(std::uint64_t seed, int width = 16, int batch = 8)
      : net({10, width, width, width, 4}, seed),
        gain(Mat::Ones(width, 1)),
        bias(Mat::Zero(width, 1)),
        X(random_matrix(10, batch, seed + 100)) {
    for (int j = 0; j < batch; ++j) labels.push_back(static_cast<int>((seed + 7 * static_cast<std::uint64_t>(j)) % 4));
  }

  double step(Tape<double>& tape, double lr) {
    tape.reset();
    V a = tape.constant(X);
    for (std::size_t i = 0; i < net.layers(); ++i) {
      V h = matmul(net.W[i], a);
      if (i + 1 == net.layers()) {
        a = h + net.b[i];
      } else if (i == 0) {
        V r = relu(h + net.b[i]);
        a = dropout(layer_norm(r, gain, bias), 0.1);
      } else {
        a = relu(h + net.b[i]);
      }
    }
    V loss = cross_entropy(a, labels);
    tape.backward(loss);
    std::vector<Parameter<double>*> ps = net.parameters();
    ps.push_back(&gain);
    ps.push_back(&bias);
    for (Parameter<double>* p : ps) {
      p->value() -= lr * p->grad();
      p->zero_grad();
    }
    return loss.item();
  }

  std::vector<Mat> values() {
    std::vector<Mat> v;
    for (Parameter<double>* p : net.parameters()) v.emplace_back(p->value());
    v.emplace_back(gain.value());
    v.emplace_back(bias.value());
    return v;
  }
};

struct run_result {
  std::vector<double> losses;
  std::vector<Mat> values;
};

run_result train(std::uint64_t seed, int steps) {
  trainer tr(seed);
  Tape<double> tape;
  tape.set_seed(seed);
  run_result r;
  for (int s = 0; s < steps; ++s) r.losses.push_back(tr.step(tape, 0.05));
  r.values = tr.values();
  return r;
}

}  // namespace

TEST_CASE("training: 1,000 steps on one tape with identical figures every step and no growth") {
  trainer tr(1);
  Tape<double> tape;
  struct figures {
    std::size_t entries, nodes, peak, reserved, bytes;
    bool operator==(const figures&) const = default;
  };
  figures first{};
  double first_loss = 0, last_loss = 0;
  int mismatches = 0;
  for (int step = 0; step < 1000; ++step) {
    const double loss = tr.step(tape, 0.05);
    const figures f{tape.entry_count(), tape.node_count(), tape.peak_bytes(), tape.memory().reserved_bytes, tape.bytes()};
    if (step == 0) {
      first = f;
      first_loss = loss;
      CHECK(f.entries > 0);
      CHECK(f.peak > f.bytes);
      CHECK(f.reserved >= f.peak);
    } else if (!(f == first)) {
      INFO("step ", step, ": entries ", f.entries, " vs ", first.entries, ", peak ", f.peak, " vs ", first.peak, ", reserved ",
           f.reserved, " vs ", first.reserved, ", bytes ", f.bytes, " vs ", first.bytes);
      CHECK(f == first);
      if (++mismatches > 3) break;
    }
    last_loss = loss;
  }
  CHECK(mismatches == 0);
  CHECK(tape.step() == 1000);
  CHECK(std::isfinite(last_loss));
  CHECK(last_loss < 0.5 * first_loss);  // it does train
}

TEST_CASE("threads: two models on two tapes at once equal one after the other") {
  const int steps = 150;
  const run_result a = train(11, steps), b = train(12, steps);
  run_result ca, cb;
  std::exception_ptr ea, eb;
  std::thread t1([&] {
    try {
      ca = train(11, steps);
    } catch (...) {
      ea = std::current_exception();
    }
  });
  std::thread t2([&] {
    try {
      cb = train(12, steps);
    } catch (...) {
      eb = std::current_exception();
    }
  });
  t1.join();
  t2.join();
  if (ea) std::rethrow_exception(ea);
  if (eb) std::rethrow_exception(eb);
  REQUIRE(ca.losses.size() == a.losses.size());
  REQUIRE(cb.losses.size() == b.losses.size());
  CHECK(std::memcmp(ca.losses.data(), a.losses.data(), sizeof(double) * a.losses.size()) == 0);
  CHECK(std::memcmp(cb.losses.data(), b.losses.data(), sizeof(double) * b.losses.size()) == 0);
  REQUIRE(ca.values.size() == a.values.size());
  for (std::size_t i = 0; i < a.values.size(); ++i) {
    CAPTURE(i);
    CHECK(same_bits(ca.values[i], a.values[i]));
    CHECK(same_bits(cb.values[i], b.values[i]));
  }
  // The two models really differ (the comparison above is not between equal runs).
  CHECK_FALSE(same_bits(a.values[0], b.values[0]));
}
