// SIGBUS from mappings of files that shrink under the daemon: a file truncated while it
// is mapped turns every access past its new end into SIGBUS, which would kill the
// daemon (weight pulls map the safetensors file; OIP system shared memory maps a
// client's object, which the client may ftruncate at any time).
//
// One handler serves both ways such memory is read:
//   - trapped_copy: a memcpy that returns false instead of faulting (weight pulls: the
//     copy is ours, so it can be abandoned and the pull refused as truncated);
//   - watched ranges: a fault inside a watched mapping (a shared-memory region) maps
//     zero pages over the rest of the range and marks it faulted, and the access goes
//     on. Such memory is read and written by code that cannot be abandoned midway (the
//     model's kernels, torch's copies), so the request finishes on zeros and is then
//     refused: the port checks faulted() after using a region.
// Any other SIGBUS goes to the handler installed before (Python's faulthandler, or the
// default action).
#pragma once

#include <cstddef>

namespace aotiserve::sigbus {

// Installs the handler (once; later calls do nothing).
void install();

// memcpy that returns false instead of dying when the source's file shrank.
bool trapped_copy(void* dst, const void* src, size_t n);

// Watches [start, start + length) (a whole mapping); returns its slot for unwatch().
// Throws std::runtime_error when every slot is taken.
int watch(void* start, size_t length);
void unwatch(int slot);

// Whether `p` lies in a watched range that has faulted (its file shrank since mapping).
bool faulted(const void* p);

}  // namespace aotiserve::sigbus
