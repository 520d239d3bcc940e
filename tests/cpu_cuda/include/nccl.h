#pragma once
// The project's CPU execution of its CUDA code (tests only): a stand-in for
// NCCL's <nccl.h>, the subset patchwork::dist::NcclCommunicator calls, over
// MPI. "Device memory" is the host memory of cpu_cuda's allocations (each
// buffer is checked to be one, as NCCL requires device pointers), and a
// collective runs to completion when it is queued (as every kernel of the CPU
// execution does), so the event recorded behind it is complete at once.
// NCCL's communicator is the ranks of MPI_COMM_WORLD in world order: the
// stand-in checks that ncclCommInitRank's rank and size are those. Values
// follow MPI's sum (NCCL's own ring/tree order is not modelled).
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <cstddef>
#include <cstring>

#include "cpu_cuda/runtime.hpp"

enum ncclResult_t {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
};
enum ncclDataType_t {
    ncclInt8 = 0, ncclChar = 0, ncclUint8 = 1, ncclInt32 = 2, ncclInt = 2, ncclUint32 = 3, ncclInt64 = 4,
    ncclUint64 = 5, ncclFloat16 = 6, ncclHalf = 6, ncclFloat32 = 7, ncclFloat = 7, ncclFloat64 = 8, ncclDouble = 8,
};
enum ncclRedOp_t { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 };

struct ncclUniqueId {
    char internal[128];
};
struct ncclComm {
    MPI_Comm comm = MPI_COMM_NULL;
    int rank = 0, size = 1;
    bool aborted = false;
};
using ncclComm_t = ncclComm*;

namespace cpu_cuda::nccl {
inline constexpr char kIdMark[] = "cpu_cuda nccl stand-in";
inline bool on_device(const void* p, std::size_t bytes) {
    return bytes == 0 || (cpu_cuda::device_of(p) >= 0 && cpu_cuda::device_of(static_cast<const char*>(p) + bytes - 1) >= 0);
}
inline MPI_Datatype mpi_type(ncclDataType_t t, bool& ok) {
    ok = true;
    switch (t) {
        case ncclUint8: return MPI_UNSIGNED_CHAR;
        case ncclInt8: return MPI_SIGNED_CHAR;
        case ncclFloat: return MPI_FLOAT;
        case ncclDouble: return MPI_DOUBLE;
        default: ok = false; return MPI_BYTE;
    }
}
inline std::size_t type_size(ncclDataType_t t) {
    return t == ncclFloat ? 4 : t == ncclDouble ? 8 : 1;
}
inline bool usable(ncclComm_t c) { return c != nullptr && !c->aborted && c->comm != MPI_COMM_NULL; }
}  // namespace cpu_cuda::nccl

inline const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error";
        case ncclSystemError: return "unhandled system error";
        case ncclInternalError: return "internal error";
        case ncclInvalidArgument: return "invalid argument";
        case ncclInvalidUsage: return "invalid usage";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
    }
    return "unknown result code";
}

inline ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (id == nullptr) return ncclInvalidArgument;
    std::memset(id->internal, 0, sizeof id->internal);
    std::memcpy(id->internal, cpu_cuda::nccl::kIdMark, sizeof cpu_cuda::nccl::kIdMark);
    return ncclSuccess;
}

inline ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    if (comm == nullptr) return ncclInvalidArgument;
    if (std::memcmp(id.internal, cpu_cuda::nccl::kIdMark, sizeof cpu_cuda::nccl::kIdMark) != 0)
        return ncclInvalidArgument;  // not an id from ncclGetUniqueId (not broadcast?)
    int world_rank = -1, world_size = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    if (nranks != world_size || rank != world_rank) return ncclInvalidArgument;
    auto* c = new ncclComm{};
    if (MPI_Comm_dup(MPI_COMM_WORLD, &c->comm) != MPI_SUCCESS) {
        delete c;
        return ncclSystemError;
    }
    c->rank = rank;
    c->size = nranks;
    *comm = c;
    return ncclSuccess;
}

inline ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (comm == nullptr) return ncclInvalidArgument;
    int down = 0;
    MPI_Finalized(&down);
    if (!down && comm->comm != MPI_COMM_NULL) MPI_Comm_free(&comm->comm);
    delete comm;
    return ncclSuccess;
}
inline ncclResult_t ncclCommAbort(ncclComm_t comm) {
    if (comm == nullptr) return ncclInvalidArgument;
    comm->aborted = true;  // the MPI job is aborted next by the caller
    return ncclSuccess;
}
inline ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* async) {
    if (comm == nullptr || async == nullptr) return ncclInvalidArgument;
    *async = comm->aborted ? ncclRemoteError : ncclSuccess;
    return ncclSuccess;
}

inline ncclResult_t ncclAllReduce(const void* send, void* recv, std::size_t count, ncclDataType_t type,
                                  ncclRedOp_t op, ncclComm_t comm, cudaStream_t) {
    using namespace cpu_cuda::nccl;
    bool ok = false;
    const MPI_Datatype t = mpi_type(type, ok);
    const std::size_t bytes = count * type_size(type);
    if (!usable(comm) || !ok || op != ncclSum) return ncclInvalidArgument;
    if (!on_device(send, bytes) || !on_device(recv, bytes)) return ncclInvalidArgument;
    if (count == 0) return ncclSuccess;
    if (send != recv) std::memmove(recv, send, bytes);
    return MPI_Allreduce(MPI_IN_PLACE, recv, int(count), t, MPI_SUM, comm->comm) == MPI_SUCCESS ? ncclSuccess
                                                                                                : ncclSystemError;
}

inline ncclResult_t ncclAllGather(const void* send, void* recv, std::size_t count, ncclDataType_t type,
                                  ncclComm_t comm, cudaStream_t) {
    using namespace cpu_cuda::nccl;
    bool ok = false;
    const MPI_Datatype t = mpi_type(type, ok);
    const std::size_t bytes = count * type_size(type);
    if (!usable(comm) || !ok) return ncclInvalidArgument;
    if (!on_device(send, bytes) || !on_device(recv, bytes * std::size_t(comm->size))) return ncclInvalidArgument;
    if (count == 0) return ncclSuccess;
    return MPI_Allgather(send, int(count), t, recv, int(count), t, comm->comm) == MPI_SUCCESS ? ncclSuccess
                                                                                              : ncclSystemError;
}

inline ncclResult_t ncclBroadcast(const void* send, void* recv, std::size_t count, ncclDataType_t type, int root,
                                  ncclComm_t comm, cudaStream_t) {
    using namespace cpu_cuda::nccl;
    bool ok = false;
    const MPI_Datatype t = mpi_type(type, ok);
    const std::size_t bytes = count * type_size(type);
    if (!usable(comm) || !ok || root < 0 || root >= comm->size) return ncclInvalidArgument;
    if ((comm->rank == root && !on_device(send, bytes)) || !on_device(recv, bytes)) return ncclInvalidArgument;
    if (count == 0) return ncclSuccess;
    if (comm->rank == root && send != recv) std::memmove(recv, send, bytes);
    return MPI_Bcast(recv, int(count), t, root, comm->comm) == MPI_SUCCESS ? ncclSuccess : ncclSystemError;
}
