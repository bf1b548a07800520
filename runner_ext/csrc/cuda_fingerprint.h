// A device-to-device copy that fingerprints the bytes it copies (cuda_fingerprint.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace aotiserve {

// Copies nbytes from src to dst on `stream` and adds the bytes' fingerprint (even-word,
// odd-word and tail sums; see the .cu) into sums[0..2], a device array of 3 int64.
// Returns nullptr once queued, else why not (nothing was queued when src or dst is not
// 16-byte aligned).
const char* copy_fingerprint(const void* src, void* dst, int64_t nbytes, int64_t* sums,
                             int sm_count, cudaStream_t stream);

}  // namespace aotiserve
