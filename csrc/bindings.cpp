// The narrow Python boundary: token ids in, flat arrays out (numpy views over C++ buffers).
//
// Lists of ints (token ids, run states, page sizes) are converted here, so that junk is reported
// by name: a non-int (a float, a bool, a str) is a TypeError, a value outside int32 an
// OverflowError. Whether a value makes sense (a negative token id, an unknown request, a model
// index out of range) is the C++ core's check: std::invalid_argument arrives as ValueError,
// std::out_of_range as IndexError. Scalar int arguments use pybind11's own conversion (a float or
// a value outside the C++ type is a TypeError naming the call).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "scheduler.h"

namespace py = pybind11;
using sre::Scheduler;

namespace {

std::string type_name(py::handle obj) { return Py_TYPE(obj.ptr())->tp_name; }

// One int32: a Python int or anything with __index__ (numpy integers), but not a bool. `name()`
// names the value in an error, and is only called then.
template <typename Name>
int32_t to_int32(py::handle item, const Name& name) {
  py::object index;  // owns what __index__ returned
  PyObject* value = item.ptr();
  if (!PyLong_CheckExact(value)) {
    if (PyBool_Check(value) || !PyIndex_Check(value))
      throw py::type_error(name() + " must be an int, got " + type_name(item));
    index = py::reinterpret_steal<py::object>(PyNumber_Index(value));
    if (!index) {
      py::error_already_set error;  // a numpy array of more than one element, say
      if (!error.matches(PyExc_TypeError)) throw error;
      throw py::type_error(name() + " must be an int, got " + type_name(item) + ": " +
                           std::string(py::str(error.value())));
    }
    value = index.ptr();
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow != 0 || v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
    throw std::overflow_error(name() + " = " + std::string(py::str(value)) + " does not fit in int32");
  return static_cast<int32_t>(v);
}

// `seq` as a list or tuple (PySequence_Fast), if it is a sequence and not a str or bytes.
py::object as_fast_sequence(py::handle seq, const std::string& what, const char* of) {
  if (!PySequence_Check(seq.ptr()) || PyUnicode_Check(seq.ptr()) || PyBytes_Check(seq.ptr()))
    throw py::type_error(what + " must be a sequence of " + of + ", got " + type_name(seq));
  auto fast = py::reinterpret_steal<py::object>(PySequence_Fast(seq.ptr(), "not a sequence"));
  if (!fast) throw py::error_already_set();
  return fast;
}

// A sequence of ints (a list, a tuple, a 1-D integer numpy array) as int32s; `what` names it.
std::vector<int32_t> to_int32s(py::handle seq, const std::string& what) {
  const py::object fast = as_fast_sequence(seq, what, "ints");
  std::vector<int32_t> out;
  out.reserve(PySequence_Fast_GET_SIZE(fast.ptr()));
  // Size and item are read afresh each time, and the item held: an __index__ may change the list.
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast.ptr()); ++i) {
    const auto item = py::reinterpret_borrow<py::object>(PySequence_Fast_GET_ITEM(fast.ptr(), i));
    out.push_back(to_int32(item, [&] { return what + "[" + std::to_string(i) + "]"; }));
  }
  return out;
}

// add_request's `views`: a sequence of token sequences, one per model.
std::vector<std::vector<int32_t>> to_views(py::handle seq) {
  const py::object fast = as_fast_sequence(seq, "views", "token id sequences");
  std::vector<std::vector<int32_t>> views;
  for (Py_ssize_t m = 0; m < PySequence_Fast_GET_SIZE(fast.ptr()); ++m) {
    const auto item = py::reinterpret_borrow<py::object>(PySequence_Fast_GET_ITEM(fast.ptr(), m));
    views.push_back(to_int32s(item, "views[" + std::to_string(m) + "]"));
  }
  return views;
}

// A numpy view of `data` kept alive by `owner` (the Python Scheduler object); no copy.
template <typename T>
py::array view(std::vector<T>& data, py::handle owner) {
  return py::array_t<T>({static_cast<py::ssize_t>(data.size())}, {static_cast<py::ssize_t>(sizeof(T))},
                        data.data(), owner);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "splitreason-engine core: page allocator and step scheduler";

  py::class_<sre::PageAllocator>(m, "PageAllocator")
      .def(py::init<int32_t>(), py::arg("num_pages"))
      .def_property_readonly("num_pages", &sre::PageAllocator::num_pages)
      .def_property_readonly("num_free", &sre::PageAllocator::num_free)
      .def_property_readonly("num_cached", &sre::PageAllocator::num_cached)
      .def("refcount", &sre::PageAllocator::refcount)
      .def("allocate",
           [](sre::PageAllocator& a, int32_t n) -> py::object {
             std::vector<int32_t> pages;
             if (!a.allocate(n, pages)) return py::none();
             return py::cast(pages);
           })
      .def("retain", &sre::PageAllocator::retain)
      .def("release", &sre::PageAllocator::release)
      .def("lookup", &sre::PageAllocator::lookup, py::arg("hash"))
      .def("publish", &sre::PageAllocator::publish, py::arg("page"), py::arg("hash"))
      .def("unpublish", &sre::PageAllocator::unpublish, py::arg("page"))
      .def("is_published", &sre::PageAllocator::is_published)
      .def("check_invariants", &sre::PageAllocator::check_invariants);

  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init([](int32_t num_pages, int32_t max_num_seqs, int32_t max_num_batched_tokens,
                       int32_t max_model_len, py::handle page_tokens, bool prefix_caching) {
             sre::SchedulerConfig c;
             c.num_pages = num_pages;
             c.max_num_seqs = max_num_seqs;
             c.max_num_batched_tokens = max_num_batched_tokens;
             c.max_model_len = max_model_len;
             c.page_tokens = to_int32s(page_tokens, "page_tokens");
             c.prefix_caching = prefix_caching;
             return std::make_unique<Scheduler>(c);
           }),
           py::arg("num_pages"), py::arg("max_num_seqs"), py::arg("max_num_batched_tokens"),
           py::arg("max_model_len"), py::arg("page_tokens"), py::arg("prefix_caching") = false)
      .def_property_readonly("num_models", &Scheduler::num_models)
      .def("max_pages_per_seq", &Scheduler::max_pages_per_seq)
      .def(
          "add_request",
          [](Scheduler& s, int64_t id, py::handle views, py::handle runs, bool reads_cache, int64_t copy_from) {
            s.add_request(id, to_views(views), to_int32s(runs, "runs"), reads_cache, copy_from);
          },
          py::arg("id"), py::arg("views"), py::arg("runs"), py::arg("reads_cache") = true, py::arg("copy_from") = -1,
          "reads_cache=False: the request computes every token itself (prompt log-probabilities); copy_from: a "
          "request with the same prompt whose partial last page it copies at admission (page_copies)")
      .def("take_page_copies", &Scheduler::take_page_copies,
           "(model, source page, destination page) triples, flat, planned since the last call: copies the caller "
           "makes before the step runs")
      .def("schedule", &Scheduler::schedule, py::arg("held_models") = 0,
           "Plans one step; models whose bit is set in held_models do not run in it")
      .def("ready_rows", &Scheduler::ready_rows, py::arg("model"))
      .def("ready_requests", &Scheduler::ready_requests, py::arg("model"))
      .def(
          "append",
          [](Scheduler& s, int64_t id, int32_t model, py::handle tokens) {
            s.append(id, model, to_int32s(tokens, "tokens"));
          },
          py::arg("id"), py::arg("model"), py::arg("tokens"))
      .def("append_placeholder", &Scheduler::append_placeholder, py::arg("id"), py::arg("model"))
      .def("set_last_token", &Scheduler::set_last_token, py::arg("id"), py::arg("model"), py::arg("token"))
      .def("truncate", &Scheduler::truncate, py::arg("id"), py::arg("model"), py::arg("num_tokens"))
      .def("set_run", &Scheduler::set_run, py::arg("id"), py::arg("model"), py::arg("run"))
      .def("set_sample_tail", &Scheduler::set_sample_tail, py::arg("id"), py::arg("model"), py::arg("num_tokens"))
      .def("finish", &Scheduler::finish, py::arg("id"), py::arg("cache") = true,
           "Ends a request; cache=False keeps the pages its last step computed out of the prefix cache")
      .def("buffers",
           [](py::object self, int32_t model) {
             auto& b = self.cast<Scheduler&>().buffers(model);
             py::dict d;
             d["input_ids"] = view(b.input_ids, self);
             d["positions"] = view(b.positions, self);
             d["slot_mapping"] = view(b.slot_mapping, self);
             d["query_start_loc"] = view(b.query_start_loc, self);
             d["seq_lens"] = view(b.seq_lens, self);
             d["block_tables"] = view(b.block_tables, self);
             d["logits_indices"] = view(b.logits_indices, self);
             d["seq_request_ids"] = view(b.seq_request_ids, self);
             d["sample_request_ids"] = view(b.sample_request_ids, self);
             return d;
           })
      .def("counts", [](py::object self) { return view(self.cast<Scheduler&>().counts(), self); })
      .def_property_readonly("num_waiting", &Scheduler::num_waiting)
      .def_property_readonly("num_running", &Scheduler::num_running)
      .def_property_readonly("num_free_pages", &Scheduler::num_free_pages)
      .def_property_readonly("num_cached_pages", &Scheduler::num_cached_pages)
      .def_property_readonly("prefix_caching", [](const Scheduler& s) { return s.config().prefix_caching; })
      .def_property_readonly("num_preemptions", &Scheduler::num_preemptions)
      .def_property_readonly("num_view_drops", &Scheduler::num_view_drops)
      .def("pages_held", &Scheduler::pages_held)
      .def("has_request", &Scheduler::has_request)
      .def("view_size",
           [](const Scheduler& s, int64_t id, int32_t model) { return static_cast<int32_t>(s.view(id, model).tokens.size()); })
      .def("view_computed", [](const Scheduler& s, int64_t id, int32_t model) { return s.view(id, model).num_computed; })
      .def("view_run", [](const Scheduler& s, int64_t id, int32_t model) { return static_cast<int>(s.view(id, model).run); })
      .def("view_stats",
           [](const Scheduler& s, int64_t id, int32_t model) {
             const sre::View& v = s.view(id, model);
             return py::make_tuple(v.peak_pages, v.num_processed, v.num_cached);
           },
           "(peak pages held, tokens processed including recomputation, tokens taken from the prefix cache) of one view")
      .def("request_pages", [](const Scheduler& s, int64_t id, int32_t model) { return s.view(id, model).pages; })
      .def("request_tokens", [](const Scheduler& s, int64_t id, int32_t model) { return s.view(id, model).tokens; })
      .def("check_invariants", &Scheduler::check_invariants);

  m.attr("NUM_COUNT_FIELDS") = static_cast<int>(sre::kNumCountFields);
  m.attr("PLACEHOLDER") = static_cast<int>(Scheduler::kPlaceholder);
  m.attr("RUN_IDLE") = static_cast<int>(sre::Run::kIdle);
  m.attr("RUN_FOREGROUND") = static_cast<int>(sre::Run::kForeground);
  m.attr("RUN_BACKGROUND") = static_cast<int>(sre::Run::kBackground);
}
