// GPU test helpers. The parent process of a GPU test must never initialise CUDA: the ranks are
// forked children that call cudaSetDevice, and a CUDA context does not survive fork(). Whatever the
// parent needs to know about the GPUs is therefore asked of a short-lived child.
#pragma once

#include <gtest/gtest.h>

namespace epcomm::testing {

// The number of GPUs a rank can see (CUDA_VISIBLE_DEVICES applies); 0 without a driver or device.
// Asked once of a forked child, then cached.
int visible_gpu_count();

}  // namespace epcomm::testing

// Skips the current test unless at least `n` GPUs are visible.
#define EPCOMM_REQUIRE_GPUS(n)                                                            \
  do {                                                                                    \
    const int epcomm_visible_gpus_ = ::epcomm::testing::visible_gpu_count();              \
    if (epcomm_visible_gpus_ < (n))                                                       \
      GTEST_SKIP() << "needs " << (n) << " GPUs, " << epcomm_visible_gpus_ << " visible"; \
  } while (0)
