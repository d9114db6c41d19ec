// The narrow Python boundary: token ids in, flat arrays out (numpy views over C++ buffers).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "scheduler.h"

namespace py = pybind11;
using sre::Scheduler;

namespace {

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
      .def("refcount", &sre::PageAllocator::refcount)
      .def("allocate",
           [](sre::PageAllocator& a, int32_t n) -> py::object {
             std::vector<int32_t> pages;
             if (!a.allocate(n, pages)) return py::none();
             return py::cast(pages);
           })
      .def("retain", &sre::PageAllocator::retain)
      .def("release", &sre::PageAllocator::release);

  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init([](int32_t num_pages, int32_t max_num_seqs, int32_t max_num_batched_tokens,
                       int32_t max_model_len, std::vector<int32_t> page_tokens) {
             sre::SchedulerConfig c;
             c.num_pages = num_pages;
             c.max_num_seqs = max_num_seqs;
             c.max_num_batched_tokens = max_num_batched_tokens;
             c.max_model_len = max_model_len;
             c.page_tokens = std::move(page_tokens);
             return std::make_unique<Scheduler>(c);
           }),
           py::arg("num_pages"), py::arg("max_num_seqs"), py::arg("max_num_batched_tokens"),
           py::arg("max_model_len"), py::arg("page_tokens"))
      .def_property_readonly("num_models", &Scheduler::num_models)
      .def("max_pages_per_seq", &Scheduler::max_pages_per_seq)
      .def("add_request", &Scheduler::add_request, py::arg("id"), py::arg("views"), py::arg("runs"))
      .def("schedule", &Scheduler::schedule, py::arg("held_models") = 0,
           "Plans one step; models whose bit is set in held_models do not run in it")
      .def("ready_rows", &Scheduler::ready_rows, py::arg("model"))
      .def("ready_requests", &Scheduler::ready_requests, py::arg("model"))
      .def("append", &Scheduler::append, py::arg("id"), py::arg("model"), py::arg("tokens"))
      .def("truncate", &Scheduler::truncate, py::arg("id"), py::arg("model"), py::arg("num_tokens"))
      .def("set_run", &Scheduler::set_run, py::arg("id"), py::arg("model"), py::arg("run"))
      .def("finish", &Scheduler::finish, py::arg("id"))
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
      .def_property_readonly("num_preemptions", &Scheduler::num_preemptions)
      .def_property_readonly("num_view_drops", &Scheduler::num_view_drops)
      .def("pages_held", &Scheduler::pages_held)
      .def("has_request", &Scheduler::has_request)
      .def("view_size", [](const Scheduler& s, int64_t id, int32_t model) {
        return static_cast<int32_t>(s.request(id).views.at(model).tokens.size()); })
      .def("view_computed", [](const Scheduler& s, int64_t id, int32_t model) { return s.request(id).views.at(model).num_computed; })
      .def("view_stats",
           [](const Scheduler& s, int64_t id, int32_t model) {
             const sre::View& v = s.request(id).views.at(model);
             return py::make_tuple(v.peak_pages, v.num_processed);
           },
           "(peak pages held, tokens processed including recomputation) of one view")
      .def("request_pages", [](const Scheduler& s, int64_t id, int32_t model) { return s.request(id).views.at(model).pages; })
      .def("request_tokens", [](const Scheduler& s, int64_t id, int32_t model) { return s.request(id).views.at(model).tokens; })
      .def("check_invariants", &Scheduler::check_invariants);

  m.attr("NUM_COUNT_FIELDS") = static_cast<int>(sre::kNumCountFields);
  m.attr("RUN_IDLE") = static_cast<int>(sre::Run::kIdle);
  m.attr("RUN_FOREGROUND") = static_cast<int>(sre::Run::kForeground);
  m.attr("RUN_BACKGROUND") = static_cast<int>(sre::Run::kBackground);
}
