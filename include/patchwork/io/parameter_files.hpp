#pragma once
// Model parameters saved and loaded by their dotted names, as safetensors
// files (io/safetensors.hpp holds the file format itself): whole models
// (save_parameters / load_parameters), the shared pre-trained base
// (save_base / load_base) and one task's patch (save_patch / load_patch).
// Selectors choose which parameters a file holds; loading checks every
// selected parameter's presence, shape and dtype, and (strict by default)
// that the file holds nothing else. docs/safetensors.md describes the rules.
#include <cstddef>
#include <deque>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "patchwork/core/module.hpp"
#include "patchwork/core/parameter.hpp"
#include "patchwork/io/safetensors.hpp"

namespace patchwork {

/// Options of the model-level loaders.
struct LoadOptions {
    /// Tensors in the file that no selected parameter asks for are an error
    /// when true, ignored when false.
    bool strict = true;
};

/// Every parameter.
struct AllParameters {
    template <class T, class D>
    bool operator()(const Parameter<T, D>&) const noexcept {
        return true;
    }
};

/// The shared pre-trained parameters: pre-trained roles owned by no task.
struct BaseParameters {
    template <class T, class D>
    bool operator()(const Parameter<T, D>& p) const noexcept {
        return !is_injected(p.role()) && p.task() == shared_task;
    }
};

/// The parameters a task trains: those owned by `task`, and injected
/// parameters owned by no task (the patch of a single-task model).
struct PatchParameters {
    int task = shared_task;
    template <class T, class D>
    bool operator()(const Parameter<T, D>& p) const noexcept {
        return (task != shared_task && p.task() == task) || (is_injected(p.role()) && p.task() == shared_task);
    }
};

/// Write the parameters of `model` that `keep` selects, under their dotted
/// names, plus `metadata` and the format tag. Throws IoError naming the path
/// (two selected parameters with one name included). A device model's values
/// are copied to the host first.
template <class M, class Filter = AllParameters>
void save_parameters(M& model, const std::filesystem::path& path, Filter keep = {},
                     SafetensorsMetadata metadata = {}) {
    SafetensorsWriter w;
    std::deque<Tensor<typename M::Scalar>> host;  // device values' host copies, alive until the file is written
    model.visit([&](auto& p) {
        if (!keep(std::as_const(p))) return;
        if constexpr (std::is_same_v<typename std::remove_cvref_t<decltype(p)>::Device, Cpu>)
            w.add(p.name(), p.value);
        else
            w.add(p.name(), host.emplace_back(to_host(p.value)));
    });
    for (auto& [k, v] : metadata) w.add_metadata(k, v);
    w.add_metadata(safetensors_format_key, safetensors_format_version);
    w.save(path);
}

/// Read into the parameters of `model` that `keep` selects, by dotted name.
/// Everything is checked before any value changes: each selected parameter
/// must be in the file with its shape (the error names the file, the
/// parameter and both shapes) and dtype F32, F64 or BF16 (converted to the
/// model's element type); tensors no selected
/// parameter asks for are an error unless `options.strict` is false.
/// Returns the file's metadata.
template <class M, class Filter = AllParameters>
SafetensorsMetadata load_parameters(M& model, const SafetensorsFile& file, Filter keep = {},
                                    LoadOptions options = {}) {
    using T = typename M::Scalar;
    using D = device_of_t<M>;
    const std::string& src = file.source();
    std::vector<std::pair<Parameter<T, D>*, const SafetensorsEntry*>> plan;
    std::set<std::string_view> wanted;
    model.visit([&](Parameter<T, D>& p) {
        if (!keep(std::as_const(p))) return;
        if (!wanted.insert(p.name()).second)
            detail::safetensors_fail(src, detail::concat("the model has two parameters named '", p.name(), "'"));
        const SafetensorsEntry* e = file.find(p.name());
        if (!e) detail::safetensors_fail(src, detail::concat("missing tensor '", p.name(), "' (shape ", p.value.shape(), ")"));
        const Shape& want = p.value.shape();
        const bool same = e->shape.size() == want.rank() && std::equal(e->shape.begin(), e->shape.end(), want.begin());
        if (!same)
            detail::safetensors_fail(src, detail::concat("shape mismatch for parameter '", p.name(), "': the model has ",
                                                         want, ", the file has ", detail::safetensors_shape_str(e->shape)));
        if (e->dtype != "F32" && e->dtype != "F64" && e->dtype != "BF16")
            detail::safetensors_fail(src, detail::concat("tensor '", p.name(), "' has dtype ", e->dtype,
                                                         "; patchwork reads F32, F64 and BF16 (unsupported dtype)"));
        plan.emplace_back(&p, e);
    });
    if (options.strict) {
        std::vector<std::string> unexpected;
        for (const auto& e : file.entries())
            if (!wanted.contains(e.name)) unexpected.push_back(e.name);
        if (!unexpected.empty()) {
            std::string list;
            for (std::size_t i = 0; i < unexpected.size() && i < 5; ++i) list += (i ? ", '" : "'") + unexpected[i] + "'";
            if (unexpected.size() > 5) list += detail::concat(" and ", unexpected.size() - 5, " more");
            detail::safetensors_fail(src, detail::concat(unexpected.size(), " unexpected tensor",
                                                         unexpected.size() == 1 ? "" : "s",
                                                         " that no selected parameter of the model has: ", list,
                                                         " (pass strict = false to ignore them)"));
        }
    }
    for (auto& [p, e] : plan) {
        if constexpr (std::is_same_v<D, Cpu>) {
            file.read_into(*e, p->value.data());
        } else {  // read on the host, then one copy to the device
            Tensor<T> host(p->value.shape());
            file.read_into(*e, host.data());
            copy(host, p->value);
        }
    }
    return file.metadata();
}

/// load_parameters from the file at `path`.
template <class M, class Filter = AllParameters>
SafetensorsMetadata load_parameters(M& model, const std::filesystem::path& path, Filter keep = {},
                                    LoadOptions options = {}) {
    return load_parameters(model, read_safetensors(path), std::move(keep), options);
}

/// Save the shared pre-trained parameters (BaseParameters), tagged "kind": "base".
template <class M>
void save_base(M& model, const std::filesystem::path& path, SafetensorsMetadata metadata = {}) {
    metadata["kind"] = "base";
    save_parameters(model, path, BaseParameters{}, std::move(metadata));
}

/// Load the shared pre-trained parameters written by save_base.
template <class M>
SafetensorsMetadata load_base(M& model, const std::filesystem::path& path, LoadOptions options = {}) {
    return load_parameters(model, path, BaseParameters{}, options);
}

/// Save the patch of `task` (PatchParameters), tagged "kind": "patch" and "task": its id.
template <class M>
void save_patch(M& model, const std::filesystem::path& path, int task = shared_task,
                SafetensorsMetadata metadata = {}) {
    metadata["kind"] = "patch";
    metadata["task"] = std::to_string(task);
    save_parameters(model, path, PatchParameters{task}, std::move(metadata));
}

/// Load the patch of `task`. A file whose metadata names another task is an
/// error (a patch is bound to the task it was trained for).
template <class M>
SafetensorsMetadata load_patch(M& model, const std::filesystem::path& path, int task = shared_task,
                               LoadOptions options = {}) {
    // The tag first, so a wrong file fails on its task rather than on names.
    const SafetensorsFile file = read_safetensors(path);
    const auto it = file.metadata().find("task");
    if (it != file.metadata().end() && it->second != std::to_string(task))
        detail::safetensors_fail(file.source(), detail::concat("is the patch of task ", it->second, ", not of task ",
                                                               task, " (task mismatch)"));
    return load_parameters(model, file, PatchParameters{task}, options);
}

}  // namespace patchwork
