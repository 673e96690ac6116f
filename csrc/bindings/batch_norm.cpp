// The BatchNorm operations of bnc._core, one table of array arguments each (args.h). Scalars
// (eps, momentum, count, training) are the Python layer's to check; here they are passed on.

#include "bindings/batch_norm.h"

#include "bindings/args.h"

namespace bnc_bindings {
namespace {

constexpr Elem D = Elem::data, P = Elem::param, S = Elem::stats;
constexpr Extent LIKE = Extent::like_first, C = Extent::channels;
constexpr Access IN = Access::in, OUT = Access::out;
constexpr bool OPT = true, REQ = false;

constexpr std::array<ArgSpec, 9> kForwardTrain = {{
    {"x", D, LIKE, IN, REQ},
    {"out", D, LIKE, OUT, REQ},
    {"weight", P, C, IN, OPT},
    {"bias", P, C, IN, OPT},
    {"running_mean", P, C, OUT, OPT},
    {"running_var", P, C, OUT, OPT},
    {"save_mean", P, C, OUT, REQ},
    {"save_invstd", P, C, OUT, REQ},
    {"residual", D, LIKE, IN, OPT},
}};

constexpr std::array<ArgSpec, 9> kForwardEval = {{
    {"x", D, LIKE, IN, REQ},
    {"out", D, LIKE, OUT, REQ},
    {"weight", P, C, IN, OPT},
    {"bias", P, C, IN, OPT},
    {"running_mean", P, C, IN, REQ},
    {"running_var", P, C, IN, REQ},
    {"save_mean", P, C, OUT, REQ},
    {"save_invstd", P, C, OUT, REQ},
    {"residual", D, LIKE, IN, OPT},
}};

constexpr std::array<ArgSpec, 10> kBackward = {{
    {"dy", D, LIKE, IN, REQ},
    {"x", D, LIKE, IN, REQ},
    {"out", D, LIKE, OUT, REQ},
    {"save_mean", P, C, IN, REQ},
    {"save_invstd", P, C, IN, REQ},
    {"weight", P, C, IN, OPT},
    {"grad_weight", P, C, OUT, REQ},
    {"grad_bias", P, C, OUT, REQ},
    {"y", D, LIKE, IN, OPT},
    {"grad_residual", D, LIKE, OUT, OPT},
}};

constexpr std::array<ArgSpec, 3> kStats = {{
    {"x", D, LIKE, IN, REQ},
    {"mean", S, C, OUT, REQ},
    {"m2", S, C, OUT, REQ},
}};

constexpr std::array<ArgSpec, 6> kElemt = {{
    {"x", D, LIKE, IN, REQ},
    {"out", D, LIKE, OUT, REQ},
    {"mean", S, C, IN, REQ},
    {"invstd", S, C, IN, REQ},
    {"weight", P, C, IN, OPT},
    {"bias", P, C, IN, OPT},
}};

// invstd does not enter the sums; it is checked so that the call's statistics are whole.
constexpr std::array<ArgSpec, 6> kBackwardReduce = {{
    {"dy", D, LIKE, IN, REQ},
    {"x", D, LIKE, IN, REQ},
    {"mean", S, C, IN, REQ},
    {"invstd", S, C, IN, REQ},
    {"sum_dy", S, C, OUT, REQ},
    {"sum_dy_xmu", S, C, OUT, REQ},
}};

constexpr std::array<ArgSpec, 8> kBackwardElemt = {{
    {"dy", D, LIKE, IN, REQ},
    {"x", D, LIKE, IN, REQ},
    {"out", D, LIKE, OUT, REQ},
    {"mean", S, C, IN, REQ},
    {"invstd", S, C, IN, REQ},
    {"weight", P, C, IN, OPT},
    {"sum_dy", S, C, IN, REQ},
    {"sum_dy_xmu", S, C, IN, REQ},
}};

// The element types of a kernel set, for the calls below.
template <class K>
using Data = typename K::Data;
template <class K>
using Param = typename K::Param;

}  // namespace

void bind_batch_norm(py::module_& m) {
  m.def(
      "forward_train",
      [](py::handle x, py::handle out, py::handle weight, py::handle bias, py::handle running_mean,
         py::handle running_var, int64_t axis, double eps, double momentum, py::handle save_mean,
         py::handle save_invstd, py::handle residual, bool relu) {
        return run_op(kForwardTrain,
                      {x, out, weight, bias, running_mean, running_var, save_mean, save_invstd,
                       residual},
                      axis, true, [&](const auto& k, const auto& a, bnc::Geometry g, int threads) {
                        using T = Data<std::decay_t<decltype(k)>>;
                        using Pm = Param<std::decay_t<decltype(k)>>;
                        const bnc::ForwardEpilogue<T> epilogue{a.template in<T>(8), relu};
                        return k.forward_train(a.template in<T>(0), a.template out<T>(1),
                                               epilogue, g, a.template in<Pm>(2),
                                               a.template in<Pm>(3), eps, momentum,
                                               a.template out<Pm>(4), a.template out<Pm>(5),
                                               a.template out<Pm>(6), a.template out<Pm>(7),
                                               threads);
                      });
      },
      py::arg("x"), py::arg("out"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"),
      py::arg("running_var"), py::arg("axis"), py::arg("eps"), py::arg("momentum"),
      py::arg("save_mean"), py::arg("save_invstd"), py::arg("residual") = py::none(),
      py::arg("relu") = false,
      "Training forward with batch statistics, y = relu?(BN(x) + residual?); returns the number "
      "of channels whose running statistics were not updated because the batch statistics were "
      "not finite.");

  m.def(
      "forward_eval",
      [](py::handle x, py::handle out, py::handle weight, py::handle bias, py::handle running_mean,
         py::handle running_var, int64_t axis, double eps, py::handle save_mean,
         py::handle save_invstd, py::handle residual, bool relu) {
        run_op(kForwardEval,
               {x, out, weight, bias, running_mean, running_var, save_mean, save_invstd, residual},
               axis, false, [&](const auto& k, const auto& a, bnc::Geometry g, int threads) {
                 using T = Data<std::decay_t<decltype(k)>>;
                 using Pm = Param<std::decay_t<decltype(k)>>;
                 const bnc::ForwardEpilogue<T> epilogue{a.template in<T>(8), relu};
                 return k.forward_eval(a.template in<T>(0), a.template out<T>(1), epilogue, g,
                                       a.template in<Pm>(2), a.template in<Pm>(3),
                                       a.template in<Pm>(4), a.template in<Pm>(5), eps,
                                       a.template out<Pm>(6), a.template out<Pm>(7), threads);
               });
      },
      py::arg("x"), py::arg("out"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"),
      py::arg("running_var"), py::arg("axis"), py::arg("eps"), py::arg("save_mean"),
      py::arg("save_invstd"), py::arg("residual") = py::none(), py::arg("relu") = false,
      "Inference forward with the running statistics, y = relu?(BN(x) + residual?).");

  m.def(
      "backward",
      [](py::handle dy, py::handle x, py::handle out, py::handle save_mean, py::handle save_invstd,
         py::handle weight, int64_t axis, bool training, py::handle grad_weight,
         py::handle grad_bias, py::handle y, py::handle grad_residual) {
        if (y.is_none() && !grad_residual.is_none())
          throw py::value_error("grad_residual: expected y (the ReLU's output) with it, got None");
        run_op(kBackward,
               {dy, x, out, save_mean, save_invstd, weight, grad_weight, grad_bias, y,
                grad_residual},
               axis, false, [&](const auto& k, const auto& a, bnc::Geometry g, int threads) {
                 using T = Data<std::decay_t<decltype(k)>>;
                 using Pm = Param<std::decay_t<decltype(k)>>;
                 const bnc::BackwardEpilogue<T> epilogue{a.template in<T>(8),
                                                         a.template out<T>(9)};
                 return k.backward(a.template in<T>(0), a.template in<T>(1), a.template out<T>(2),
                                   epilogue, g, a.template in<Pm>(3), a.template in<Pm>(4),
                                   a.template in<Pm>(5), training, a.template out<Pm>(6),
                                   a.template out<Pm>(7), threads);
               });
      },
      py::arg("dy"), py::arg("x"), py::arg("out"), py::arg("save_mean"), py::arg("save_invstd"),
      py::arg("weight"), py::arg("axis"), py::arg("training"), py::arg("grad_weight"),
      py::arg("grad_bias"), py::arg("y") = py::none(), py::arg("grad_residual") = py::none(),
      "Backward: writes dx into out, grad_weight and grad_bias; with y (the ReLU's output), dy "
      "is masked by y > 0 first, and written masked into grad_residual when given.");

  m.def(
      "stats",
      [](py::handle x, py::handle mean, py::handle m2, int64_t axis) {
        run_op(kStats, {x, mean, m2}, axis, false,
               [&](const auto& k, const auto& a, bnc::Geometry g, int threads) {
                 using T = Data<std::decay_t<decltype(k)>>;
                 return k.stats(a.template in<T>(0), g, a.template out<double>(1),
                                a.template out<double>(2), threads);
               });
      },
      py::arg("x"), py::arg("mean"), py::arg("m2"), py::arg("axis"),
      "Per-channel mean and m2 = sum((x - mean)^2), in float64.");

  m.def(
      "elemt",
      [](py::handle x, py::handle out, py::handle mean, py::handle invstd, py::handle weight,
         py::handle bias, int64_t axis) {
        run_op(kElemt, {x, out, mean, invstd, weight, bias}, axis, false,
               [&](const auto& k, const auto& a, bnc::Geometry g, int threads) {
                 using T = Data<std::decay_t<decltype(k)>>;
                 using Pm = Param<std::decay_t<decltype(k)>>;
                 return k.elemt(a.template in<T>(0), a.template out<T>(1), g,
                                a.template in<double>(2), a.template in<double>(3),
                                a.template in<Pm>(4), a.template in<Pm>(5), threads);
               });
      },
      py::arg("x"), py::arg("out"), py::arg("mean"), py::arg("invstd"), py::arg("weight"),
      py::arg("bias"), py::arg("axis"), "y = (x - mean) * invstd * weight + bias.");

  m.def(
      "backward_reduce",
      [](py::handle dy, py::handle x, py::handle mean, py::handle invstd, py::handle sum_dy,
         py::handle sum_dy_xmu, int64_t axis) {
        run_op(kBackwardReduce, {dy, x, mean, invstd, sum_dy, sum_dy_xmu}, axis, false,
               [&](const auto& k, const auto& a, bnc::Geometry g, int threads) {
                 using T = Data<std::decay_t<decltype(k)>>;
                 return k.backward_reduce(a.template in<T>(0), a.template in<T>(1), g,
                                          a.template in<double>(2), a.template out<double>(4),
                                          a.template out<double>(5), threads);
               });
      },
      py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("invstd"), py::arg("sum_dy"),
      py::arg("sum_dy_xmu"), py::arg("axis"), "sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)), in float64.");

  m.def(
      "backward_elemt",
      [](py::handle dy, py::handle x, py::handle out, py::handle mean, py::handle invstd,
         py::handle weight, py::handle sum_dy, py::handle sum_dy_xmu, double count,
         int64_t axis) {
        run_op(kBackwardElemt, {dy, x, out, mean, invstd, weight, sum_dy, sum_dy_xmu}, axis, false,
               [&](const auto& k, const auto& a, bnc::Geometry g, int threads) {
                 using T = Data<std::decay_t<decltype(k)>>;
                 using Pm = Param<std::decay_t<decltype(k)>>;
                 return k.backward_elemt(a.template in<T>(0), a.template in<T>(1),
                                         a.template out<T>(2), g, a.template in<double>(3),
                                         a.template in<double>(4), a.template in<Pm>(5),
                                         a.template in<double>(6), a.template in<double>(7),
                                         count, threads);
               });
      },
      py::arg("dy"), py::arg("x"), py::arg("out"), py::arg("mean"), py::arg("invstd"),
      py::arg("weight"), py::arg("sum_dy"), py::arg("sum_dy_xmu"), py::arg("count"),
      py::arg("axis"), "dx from given sums over `count` elements per channel.");
}

}  // namespace bnc_bindings
