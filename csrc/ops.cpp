// Operator schemas of the bnorm_ext namespace; kernels are registered per
// backend in csrc/cpu and csrc/cuda, fake kernels in bnorm_ext/_fake.py.
#include <Python.h>
#include <torch/library.h>

#include <cstdint>

#include "cpu/batch_norm_cpu.h"
#include "cuda/cooperative_launch_record.h"

#ifndef BNORM_EXT_CUDA_ARCHS
#define BNORM_EXT_CUDA_ARCHS ""
#endif

extern "C" {
// Importing bnorm_ext._C runs the static registrations below.
static PyObject* build_info(PyObject*, PyObject*) {
#ifdef BNORM_EXT_WITH_CUDA
  PyObject* cuda = Py_True;
#else
  PyObject* cuda = Py_False;
#endif
#ifdef BNORM_EXT_DEBUG
  PyObject* debug = Py_True;
#else
  PyObject* debug = Py_False;
#endif
  const bnorm_ext::cpu::CpuIsa isa = bnorm_ext::cpu::cpu_isa();
  const char* cpu_isa = isa == bnorm_ext::cpu::CpuIsa::kAvx512 ? "avx512"
                        : isa == bnorm_ext::cpu::CpuIsa::kAvx2 ? "avx2"
                                                               : "default";
  return Py_BuildValue(
      "{s:O,s:s,s:O,s:s}", "cuda_compiled", cuda, "cuda_archs", BNORM_EXT_CUDA_ARCHS, "debug", debug, "cpu_isa",
      cpu_isa);
}

// Single-read kernels launched so far in this process (an int).
static PyObject* single_read_launches(PyObject*, PyObject*) {
  return PyLong_FromLongLong(bnorm_ext::cuda::single_read_launch_count().load());
}

// (kernel, device) pairs whose cooperative launch was refused (an int).
static PyObject* cooperative_refusals(PyObject*, PyObject*) {
  return PyLong_FromLongLong(bnorm_ext::cuda::cooperative_launch_record().refused_count());
}

// Forgets every recorded cooperative launch (tests only).
static PyObject* clear_cooperative_launch_record(PyObject*, PyObject*) {
  bnorm_ext::cuda::cooperative_launch_record().clear();
  Py_RETURN_NONE;
}

// Tests only: runs the launch bookkeeping of the single-read path with a fake
// launch for (kernel_id, device) that reports `refuse` (too large) or success;
// returns (attempted, launched). Releases the GIL, so threads can race on it.
static PyObject* simulate_cooperative_launch(PyObject*, PyObject* args) {
  long long kernel_id = 0, grid = 0;
  int device = 0, capturing = 0, refuse = 0;
  if (!PyArg_ParseTuple(args, "LiLpp", &kernel_id, &device, &grid, &capturing, &refuse)) {
    return nullptr;
  }
  bool attempted = false, launched = false;
  Py_BEGIN_ALLOW_THREADS const void* kernel = reinterpret_cast<const void*>(static_cast<uintptr_t>(kernel_id));
  launched = bnorm_ext::cuda::launch_cooperative_recorded(kernel, device, grid, capturing != 0, [&] {
    attempted = true;
    return refuse ? bnorm_ext::cuda::CooperativeOutcome::kTooLarge : bnorm_ext::cuda::CooperativeOutcome::kLaunched;
  });
  Py_END_ALLOW_THREADS return Py_BuildValue("(OO)", attempted ? Py_True : Py_False, launched ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How the extension was compiled."},
    {"_single_read_launches", single_read_launches, METH_NOARGS, "Single-read kernels launched in this process."},
    {"_cooperative_refusals", cooperative_refusals, METH_NOARGS,
     "(kernel, device) pairs whose cooperative launch was refused."},
    {"_clear_cooperative_launch_record", clear_cooperative_launch_record, METH_NOARGS,
     "Tests only: forget every recorded cooperative launch."},
    {"_simulate_cooperative_launch", simulate_cooperative_launch, METH_VARARGS,
     "Tests only: (kernel_id, device, grid, capturing, refuse) -> (attempted, launched)."},
    {nullptr, nullptr, 0, nullptr}};

PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

// Shapes: input is (N, C, *); per-channel tensors are [C]; per-process
// statistics are [P, C] with counts [P]. Statistics come back in the acc dtype
// (float64 for float64 input, float32 otherwise).
TORCH_LIBRARY(bnorm_ext, m) {
  // NB: flexible_layout: every kernel takes tensors of any strides (a
  // non-dense one is made dense inside) and allocates each input-shaped output
  // in the input's suggested memory format, as the fake kernels declare; so
  // Inductor hands the ops its buffers as they are (e.g. channels-last
  // convolution outputs) instead of copying them to the traced strides (its
  // default for custom ops, needs_exact_strides).
  const std::vector<at::Tag> any_strides = {at::Tag::flexible_layout};
  // Per-channel mean and biased variance of the input.
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)", any_strides);
  // Merges per-process (mean, var, count) in a fixed order; updates running
  // stats (unbiased var); returns the global mean and invstd.
  m.def(
      "batch_norm_gather_stats(Tensor mean, Tensor var, Tensor counts, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float? momentum, float eps) "
      "-> (Tensor mean, Tensor invstd)",
      any_strides);
  // y = (x - mean) * invstd * weight + bias.
  m.def(
      "batch_norm_elemt(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd) -> Tensor",
      any_strides);
  // Training forward: batch statistics, running-stat update, normalization.
  m.def(
      "batch_norm_forward_train(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float? momentum, float eps) "
      "-> (Tensor output, Tensor save_mean, Tensor save_invstd)",
      any_strides);
  // Eval forward: one scale-shift from the running statistics.
  m.def(
      "batch_norm_forward_eval(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor running_mean, Tensor running_var, float eps) -> Tensor",
      any_strides);
  // Gradients of input, weight and bias (training: saved batch stats; eval:
  // running stats and eps).
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, "
      "Tensor? running_mean, Tensor? running_var, Tensor? save_mean, "
      "Tensor? save_invstd, bool training, float eps) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
      any_strides);
  // NB: the `.out` overloads write every element of each out tensor, in its
  // own strides. They are not tagged out (which would make Inductor call them
  // with buffers it plans): measured on a 2-core CPU, a compiled ResNet-18
  // training step was 8-18% slower through batch_norm_backward.out than
  // through the functional op (benchmarks/bench_compile.py), and Inductor
  // (torch 2.14) passes an unallocated buffer for a zero-element output such
  // as batch_norm_act_backward's [0] grad_residual.
  m.def(
      "batch_norm_backward.out(Tensor grad_out, Tensor input, Tensor? weight, "
      "Tensor? running_mean, Tensor? running_var, Tensor? save_mean, "
      "Tensor? save_invstd, bool training, float eps, *, Tensor(a!) grad_input, "
      "Tensor(b!) grad_weight, Tensor(c!) grad_bias) -> (Tensor(a!), Tensor(b!), Tensor(c!))",
      any_strides);
  // Forward-mode derivative of the forward ops (tangents of output, mean and
  // invstd; undefined tangents are zero); mean/invstd: batch statistics when
  // training, else running_mean and 1/sqrt(running_var + eps). A composite of
  // ATen ops, used by the ops' autograd kernels and BatchNormFunction.jvp.
  m.def(
      "batch_norm_forward_jvp(Tensor input, Tensor? input_t, Tensor? weight, "
      "Tensor? weight_t, Tensor? bias_t, Tensor mean, Tensor invstd, "
      "bool training) -> (Tensor output_t, Tensor mean_t, Tensor invstd_t)",
      any_strides);
  // Per-channel sum(dy) and sum(dy * (x - mean)).
  m.def(
      "batch_norm_backward_reduce(Tensor grad_out, Tensor input, Tensor mean) "
      "-> (Tensor sum_dy, Tensor sum_dy_xmu)",
      any_strides);
  // Training-mode input gradient from (globally reduced) sums; the count is
  // counts.sum().
  m.def(
      "batch_norm_backward_elemt(Tensor grad_out, Tensor input, Tensor mean, "
      "Tensor invstd, Tensor? weight, Tensor sum_dy, Tensor sum_dy_xmu, "
      "Tensor counts) -> Tensor",
      any_strides);
  // Fused y = act(BN(x) + residual): activation is identity, relu,
  // leaky_relu (negative_slope >= 0) or silu; residual is optional, input's
  // shape and dtype. Training forward: as batch_norm_forward_train.
  m.def(
      "batch_norm_act_forward_train(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float? momentum, float eps, "
      "Tensor? residual, str activation, float negative_slope) "
      "-> (Tensor output, Tensor save_mean, Tensor save_invstd)",
      any_strides);
  m.def(
      "batch_norm_act_forward_eval(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor running_mean, Tensor running_var, float eps, Tensor? residual, "
      "str activation, float negative_slope) -> Tensor",
      any_strides);
  // Gradients of input, weight, bias and residual (an empty [0] tensor unless
  // need_grad_residual). relu/leaky_relu read their derivative from
  // `output`; silu recomputes the pre-activation from input, the statistics,
  // weight, bias and `residual` (so only silu needs bias and residual, only
  // relu/leaky_relu need output).
  m.def(
      "batch_norm_act_backward(Tensor grad_out, Tensor? output, Tensor input, "
      "Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "Tensor? save_mean, Tensor? save_invstd, Tensor? residual, bool training, "
      "float eps, bool need_grad_residual, str activation, float negative_slope) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)",
      any_strides);
  m.def(
      "batch_norm_act_backward.out(Tensor grad_out, Tensor? output, Tensor input, "
      "Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "Tensor? save_mean, Tensor? save_invstd, Tensor? residual, bool training, "
      "float eps, bool need_grad_residual, str activation, float negative_slope, *, "
      "Tensor(a!) grad_input, Tensor(b!) grad_weight, Tensor(c!) grad_bias, Tensor(d!) grad_residual) "
      "-> (Tensor(a!), Tensor(b!), Tensor(c!), Tensor(d!))",
      any_strides);
}
