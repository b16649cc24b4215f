// StepLists: the tensor lists of an optimizer's step plan, held on the C++ side (sam_kernels._C.StepLists).
//
// Why: a torch op called from Python converts each tensor of each list argument into an IValue, 100-250 ns
// per tensor and per list. A SAM iteration passes nine lists (the gradients twice, the parameters, backups
// and momentum buffers), so at a few hundred tensors the conversions alone cost about as much as torch's
// whole fused SGD step. The step plan (sam_kernels/optim/plan.py) builds one StepLists when its parameter
// set changes; each step then crosses into C++ a constant number of times: `collect` reads the gradients
// off the parameters here, and the op methods call the registered ops through the dispatcher with
// ArrayRef slices of these vectors (no copy, no conversion). The ops run their own checks as usual.
//
// NOTE (what a StepLists assumes): its parameters are plain (local, not DTensor) tensors on one device;
// the plan checks that before building one and otherwise calls the ops with Python lists. `current`
// answers the plan's staleness questions that involve every tensor (the same parameter objects in the
// param groups, the same storage), and `collect` those of the gradients (each planned parameter holds a
// dense gradient laid out like it, no unplanned one holds a gradient); the plan asks both at every step.
#include <torch/csrc/utils/pybind.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace sam_kernels {
namespace {

namespace py = pybind11;

// What `collect` found, bits of its status; the values are part of the Python interface (plan.py).
enum Collected : int {
  kStale = 1,    // a planned parameter has none (not allowed), or an unplanned one has one: rebuild the plan
  kCheck = 2,    // a gradient failed the quick layout check: the plan's named checks decide (rare)
  kMissing = 4,  // some planned parameters have none (allowed: the plan says which may lack one)
};

// The registered ops, looked up once (the dispatcher's typed handles stay valid for the process).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// NOTE (below autograd): the ops have no autograd kernels, so a call with parameters (which require
// grad) would go through torch's boxed autograd fallbacks, which convert every list to IValues and back:
// the per-tensor cost this class exists to avoid. The engine calls every op under no_grad and nothing
// here is differentiable, so the calls skip the autograd and ADInplaceOrView keys and reach the CPU or
// CUDA kernel unboxed, as the Python calls reached it through the fallbacks (which bump no version
// counter for these ops either).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// NOTE (GIL): the op methods release the GIL while the kernels run, as torch's own op calls from Python
// do (a CPU step can take tens of milliseconds); the Python objects they read (the kept mask's bytes)
// are held by the caller's arguments for the whole call.

using OptionalTensor = std::optional<at::Tensor>;

// The rows of a step that take part in its ascent (ESAM's per-tensor SWP leaves some out): None for all of
// them, else bytes with one 0/1 entry per planned parameter.
class Kept {
 public:
  Kept(const py::object& mask, size_t rows) {
    if (mask.is_none()) return;
    char* data = nullptr;
    Py_ssize_t size = 0;
    TORCH_CHECK(PyBytes_Check(mask.ptr()) && PyBytes_AsStringAndSize(mask.ptr(), &data, &size) == 0 &&
                    static_cast<size_t>(size) == rows,
                "StepLists: kept must be None or bytes with one entry per planned parameter");
    flags_ = reinterpret_cast<const uint8_t*>(data);
  }
  bool all() const { return flags_ == nullptr; }
  bool operator[](size_t row) const { return flags_ == nullptr || flags_[row] != 0; }

 private:
  const uint8_t* flags_ = nullptr;
};

struct GroupLists {
  int64_t start = 0;
  int64_t stop = 0;
  // The fused descent's state lists of the group (SGD: momentum buffers; Adam: exp_avg, exp_avg_sq,
  // max_exp_avg_sq, step) and SGD's first-step flags; set by the group's state (fused_steps.py).
  std::vector<at::Tensor> state[4];
  std::vector<int64_t> first_step;
};

class StepLists {
 public:
  StepLists(const py::list& param_lists, std::vector<at::Tensor> params, std::vector<at::Tensor> without_grad,
            std::vector<at::Tensor> backups, const std::vector<int64_t>& bounds,
            std::vector<int64_t> positions, bool contiguous)
      : params_(std::move(params)),
        without_grad_(std::move(without_grad)),
        backups_(std::move(backups)),
        positions_(std::move(positions)),
        contiguous_(contiguous) {
    TORCH_CHECK(backups_.size() == params_.size() && positions_.size() == params_.size(),
                "StepLists: params, backups and positions differ in length");
    TORCH_CHECK(bounds.size() % 2 == 0, "StepLists: bounds must be (start, stop) pairs");
    for (size_t k = 0; k < bounds.size(); k += 2) {
      TORCH_CHECK(0 <= bounds[k] && bounds[k] <= bounds[k + 1] &&
                      bounds[k + 1] <= static_cast<int64_t>(params_.size()),
                  "StepLists: a group's rows are out of range");
      GroupLists group;
      group.start = bounds[k];
      group.stop = bounds[k + 1];
      groups_.push_back(std::move(group));
    }
    for (const py::handle list : param_lists) {
      const py::sequence items = py::reinterpret_borrow<py::sequence>(list);
      lengths_.push_back(static_cast<Py_ssize_t>(items.size()));
      for (const py::handle item : items) objects_.push_back(py::reinterpret_borrow<py::object>(item));
    }
    pointers_.reserve(params_.size());
    for (const at::Tensor& p : params_) pointers_.push_back(p.data_ptr());
    grads_.resize(params_.size());
  }

  // Whether the param groups still hold exactly the planned parameter objects (`param_lists`: each
  // group's "params" list, in order) and every planned parameter still has its storage.
  bool current(const py::list& param_lists) const {
    if (static_cast<size_t>(py::len(param_lists)) != lengths_.size()) return false;
    size_t k = 0;
    for (size_t g = 0; g < lengths_.size(); ++g) {
      // NOTE: a group's "params" is a list (torch.optim makes it one) or a tuple a user assigned; any
      // other sequence is reported stale here (the plan then checks over Python lists).
      PyObject* list = PyList_GET_ITEM(param_lists.ptr(), g);
      if (!(PyList_Check(list) || PyTuple_Check(list)) || PySequence_Fast_GET_SIZE(list) != lengths_[g]) {
        return false;
      }
      PyObject** items = PySequence_Fast_ITEMS(list);
      for (Py_ssize_t i = 0; i < lengths_[g]; ++i, ++k) {
        if (items[i] != objects_[k].ptr()) return false;
      }
    }
    for (size_t i = 0; i < params_.size(); ++i) {
      if (params_[i].data_ptr() != pointers_[i]) return false;
    }
    return true;
  }

  // Reads every planned parameter's gradient (see Collected; `allow_missing`: a missing one is reported,
  // not stale); the ops below use the gradients of the last collect until `release`. Returns the status
  // and the rows whose gradient is missing (when allowed).
  std::tuple<int, std::vector<int64_t>> collect(bool allow_missing) {
    for (const at::Tensor& p : without_grad_) {
      if (p.grad().defined()) return {kStale, {}};
    }
    int status = 0;
    std::vector<int64_t> missing;
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& g = params_[i].grad();
      grads_[i] = g;
      if (!g.defined()) {
        if (!allow_missing) return {kStale, {}};
        status |= kMissing;
        missing.push_back(static_cast<int64_t>(i));
      } else if (g.layout() != at::kStrided ||
                 (contiguous_ ? !g.is_contiguous() : g.strides() != params_[i].strides())) {
        status |= kCheck;
      }
    }
    return {status, std::move(missing)};
  }

  // The collected gradients as a Python list (None where missing), for a reader on the Python side.
  py::list grads() const {
    py::list grads(grads_.size());
    for (size_t i = 0; i < grads_.size(); ++i) grads[i] = py::cast(grads_[i]);
    return grads;
  }

  // Drops the collected gradients, so that a zero_grad(set_to_none=True) after the step frees them.
  void release() {
    for (at::Tensor& g : grads_) g.reset();
  }

  std::tuple<at::Tensor, at::Tensor> grad_norm(bool weighted, double adaptive_eta, const py::object& mask) const {
    static const auto norm_op =
        op<std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::TensorList, double)>("sam_kernels::grad_norm");
    const Kept kept(mask, params_.size());
    const py::gil_scoped_release no_gil;
    BelowAutograd below;
    if (kept.all()) {
      return norm_op.call(grads_, weighted ? at::TensorList(params_) : at::TensorList(), adaptive_eta);
    }
    std::vector<at::Tensor> grads, weights;
    for (size_t i = 0; i < params_.size(); ++i) {
      if (!kept[i]) continue;
      grads.push_back(grads_[i]);
      if (weighted) weights.push_back(params_[i]);
    }
    if (grads.empty()) {  // NOTE: zeros on the parameters' device (the op would answer on the CPU)
      const at::Tensor zero = at::zeros({}, params_.at(0).options().dtype(at::kFloat));
      return {zero, zero.clone()};
    }
    return norm_op.call(grads, weights, adaptive_eta);
  }

  // backup = w, then w += e over group `group`'s kept rows, along their collected gradients.
  void perturb(int64_t group, const at::Tensor& norm, const at::Tensor& step, double rho, double eps,
               int64_t keep_threshold, double scale_factor, bool normalize, bool adaptive, double adaptive_eta,
               int64_t seed_lo, int64_t seed_hi, const py::object& mask) {
    static const auto perturb_op =
        op<void(at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef, const at::Tensor&,
                const at::Tensor&, double, double, int64_t, double, bool, bool, double, int64_t, int64_t)>(
            "sam_kernels::perturb_");
    const GroupLists& g = group_at(group);
    const Kept kept(mask, params_.size());
    const py::gil_scoped_release no_gil;
    BelowAutograd below;
    if (kept.all()) {
      perturb_op.call(rows(params_, g), rows(grads_, g), rows(backups_, g),
                      at::IntArrayRef(positions_).slice(g.start, g.stop - g.start), norm, step, rho, eps,
                      keep_threshold, scale_factor, normalize, adaptive, adaptive_eta, seed_lo, seed_hi);
      return;
    }
    std::vector<at::Tensor> params, grads, backups;
    std::vector<int64_t> positions;
    for (int64_t i = g.start; i < g.stop; ++i) {
      if (!kept[i]) continue;
      params.push_back(params_[i]);
      grads.push_back(grads_[i]);
      backups.push_back(backups_[i]);
      positions.push_back(positions_[i]);
    }
    if (params.empty()) return;
    perturb_op.call(params, grads, backups, positions, norm, step, rho, eps, keep_threshold, scale_factor,
                    normalize, adaptive, adaptive_eta, seed_lo, seed_hi);
  }

  // w = backup over group `group`'s kept rows (the rows its perturb moved).
  void restore(int64_t group, const py::object& mask) {
    static const auto restore_op = op<void(at::TensorList, at::TensorList)>("sam_kernels::restore_");
    const GroupLists& g = group_at(group);
    const Kept kept(mask, params_.size());
    const py::gil_scoped_release no_gil;
    BelowAutograd below;
    if (kept.all()) {
      restore_op.call(rows(params_, g), rows(backups_, g));
      return;
    }
    std::vector<at::Tensor> params, backups;
    for (int64_t i = g.start; i < g.stop; ++i) {
      if (!kept[i]) continue;
      params.push_back(params_[i]);
      backups.push_back(backups_[i]);
    }
    if (!params.empty()) restore_op.call(params, backups);
  }

  void set_state(int64_t group, std::vector<at::Tensor> a, std::vector<at::Tensor> b, std::vector<at::Tensor> c,
                 std::vector<at::Tensor> d, std::vector<int64_t> first_step) {
    GroupLists& g = group_at(group);
    g.state[0] = std::move(a);
    g.state[1] = std::move(b);
    g.state[2] = std::move(c);
    g.state[3] = std::move(d);
    g.first_step = std::move(first_step);
  }

  void restore_sgd_step(int64_t group, const std::vector<double>& config, const OptionalTensor& grad_multiplier,
                        const OptionalTensor& found_inf, const py::object& mask) {
    static const auto sgd_op =
        op<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef,
                at::ArrayRef<double>, const OptionalTensor&, const OptionalTensor&)>("sam_kernels::restore_sgd_step_");
    const GroupLists& g = group_at(group);
    const std::vector<at::Tensor> backups = group_backups(g, Kept(mask, params_.size()));
    const py::gil_scoped_release no_gil;
    BelowAutograd below;
    sgd_op.call(rows(params_, g), backups, rows(grads_, g), g.state[0], g.first_step, config, grad_multiplier,
                found_inf);
  }

  // Adam's step counters advance first (by 0 where found_inf is set), as sam_kernels.backends.entry does.
  void restore_adam_step(int64_t group, const std::vector<double>& config, const OptionalTensor& grad_multiplier,
                         const OptionalTensor& found_inf, const py::object& mask) {
    static const auto adam_op =
        op<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                at::TensorList, at::ArrayRef<double>, const OptionalTensor&, const OptionalTensor&)>(
            "sam_kernels::restore_adam_step_");
    const GroupLists& g = group_at(group);
    const std::vector<at::Tensor> backups = group_backups(g, Kept(mask, params_.size()));
    const py::gil_scoped_release no_gil;
    BelowAutograd below;
    if (found_inf.has_value()) {
      const at::Tensor increment = found_inf->eq(0).to(at::kFloat);
      at::_foreach_add_(g.state[3], std::vector<at::Tensor>(g.state[3].size(), increment));
    } else {
      at::_foreach_add_(g.state[3], 1.0);
    }
    adam_op.call(rows(params_, g), backups, rows(grads_, g), g.state[0], g.state[1], g.state[2], g.state[3],
                 config, grad_multiplier, found_inf);
  }

 private:
  GroupLists& group_at(int64_t group) {
    TORCH_CHECK(0 <= group && group < static_cast<int64_t>(groups_.size()), "StepLists: no group ", group);
    return groups_[group];
  }
  const GroupLists& group_at(int64_t group) const { return const_cast<StepLists*>(this)->group_at(group); }

  static at::TensorList rows(const std::vector<at::Tensor>& list, const GroupLists& g) {
    return at::TensorList(list).slice(g.start, g.stop - g.start);
  }

  // The descent's backups of a group: a row the ascent left out is its own backup (w = backup then reads
  // the current weight; see NOTE (aliasing) in checks.h).
  std::vector<at::Tensor> group_backups(const GroupLists& g, const Kept& kept) const {
    std::vector<at::Tensor> backups(backups_.begin() + g.start, backups_.begin() + g.stop);
    if (!kept.all()) {
      for (int64_t i = g.start; i < g.stop; ++i) {
        if (!kept[i]) backups[i - g.start] = params_[i];
      }
    }
    return backups;
  }

  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> without_grad_;
  std::vector<at::Tensor> backups_;
  std::vector<int64_t> positions_;
  bool contiguous_;
  std::vector<GroupLists> groups_;
  // The param groups' parameter objects (flattened) and each group's count, for `current`.
  std::vector<py::object> objects_;
  std::vector<Py_ssize_t> lengths_;
  std::vector<const void*> pointers_;
  std::vector<at::Tensor> grads_;
};

}  // namespace

void bind_step_lists(py::module_& module) {
  py::class_<StepLists>(module, "StepLists",
                        "The tensor lists of a step plan on the C++ side (csrc/step_lists.cpp)")
      .def(py::init<const py::list&, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    const std::vector<int64_t>&, std::vector<int64_t>, bool>(),
           py::arg("param_lists"), py::arg("params"), py::arg("without_grad"), py::arg("backups"),
           py::arg("bounds"), py::arg("positions"), py::arg("contiguous"))
      .def("current", &StepLists::current)
      .def("collect", &StepLists::collect)
      .def("grads", &StepLists::grads)
      .def("release", &StepLists::release)
      .def("grad_norm", &StepLists::grad_norm)
      .def("perturb", &StepLists::perturb)
      .def("restore", &StepLists::restore)
      .def("set_state", &StepLists::set_state)
      .def("restore_sgd_step", &StepLists::restore_sgd_step)
      .def("restore_adam_step", &StepLists::restore_adam_step);
}

}  // namespace sam_kernels
