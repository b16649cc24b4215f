// GradMarks: a record of every parameter's gradient, for telling step(closure)'s two conventions apart
// (sam_kernels._C.GradMarks; the convention and the Python record it speeds up are in
// sam_kernels/optim/closure_convention.py).
//
// Why: the record is taken at the end of every step(closure) and compared at the start of the next, one
// weak reference and one version counter per parameter. In Python that costs about a microsecond per
// parameter, more than the whole two-call SAM iteration; here it is a pass over the param groups' lists.
//
// NOTE (weak references): a mark holds its gradient's TensorImpl weakly (c10::weak_intrusive_ptr), so a
// gradient cleared after the record is freed as before; the weak reference also keeps the object's
// memory from being reused, so a new gradient can never be mistaken for the recorded one by its address.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace sam_kernels {
namespace {

namespace py = pybind11;

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Mark {
  std::optional<WeakImpl> grad;  // the recorded gradient (none when there was none)
  int64_t version = 0;           // its version counter then (every in-place write, backward's included, bumps it)
};

// The parameters of `param_lists` (each group's "params", a list or a tuple: closure_convention.py
// makes any other sequence a list), flattened, as (object, tensor); false when an entry is neither.
template <typename F>
bool for_each_param(const py::list& param_lists, F&& f) {
  for (const py::handle list : param_lists) {
    if (!(PyList_Check(list.ptr()) || PyTuple_Check(list.ptr()))) return false;
    const Py_ssize_t size = PySequence_Fast_GET_SIZE(list.ptr());
    PyObject** items = PySequence_Fast_ITEMS(list.ptr());
    for (Py_ssize_t i = 0; i < size; ++i) {
      PyObject* object = items[i];
      if (!THPVariable_Check(object)) return false;
      if (!f(object, THPVariable_Unpack(object))) return false;
    }
  }
  return true;
}

class GradMarks {
 public:
  // Records the gradients of the parameters of `param_lists` as they are now.
  explicit GradMarks(const py::list& param_lists) {
    valid_ = for_each_param(param_lists, [&](PyObject* object, const at::Tensor& param) {
      objects_.push_back(py::reinterpret_borrow<py::object>(object));
      Mark mark;
      const at::Tensor& grad = param.grad();
      if (grad.defined()) {
        mark.grad.emplace(grad.getIntrusivePtr());
        mark.version = grad._version();
        any_ = true;
      }
      marks_.push_back(std::move(mark));
      return true;
    });
  }

  // Whether any parameter held a gradient at the record.
  bool any() const { return any_; }

  // Whether any parameter of `param_lists` now holds a gradient that is not the recorded one as recorded:
  // a new object, or written since. A different parameter set has nothing to compare: then whether any
  // holds a gradient at all.
  bool changed(const py::list& param_lists) const {
    size_t k = 0;
    bool same_set = valid_;
    bool any_grad = false;
    bool differs = false;
    const bool walked = for_each_param(param_lists, [&](PyObject* object, const at::Tensor& param) {
      const at::Tensor& grad = param.grad();
      any_grad = any_grad || grad.defined();
      if (!same_set || k >= marks_.size() || objects_[k].ptr() != object) {
        same_set = false;
        return true;
      }
      const Mark& mark = marks_[k++];
      if (grad.defined() && (!mark.grad.has_value() || mark.grad->expired() ||
                             mark.grad->_unsafe_get_target() != grad.unsafeGetTensorImpl() ||
                             mark.version != grad._version())) {
        differs = true;
      }
      return true;
    });
    TORCH_CHECK(walked, "GradMarks: param_lists must be lists of tensors");
    if (!same_set || k != marks_.size()) return any_grad;
    return differs;
  }

 private:
  bool valid_ = false;
  bool any_ = false;
  std::vector<py::object> objects_;
  std::vector<Mark> marks_;
};

}  // namespace

void bind_grad_marks(py::module_& module) {
  py::class_<GradMarks>(module, "GradMarks",
                        "A record of every parameter's gradient (csrc/grad_marks.cpp)")
      .def(py::init<const py::list&>(), py::arg("param_lists"))
      .def("any", &GradMarks::any)
      .def("changed", &GradMarks::changed);
}

}  // namespace sam_kernels
