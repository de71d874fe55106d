// The whole public C++ API of epcomm.
#pragma once

#include "epcomm/bootstrap.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/config.hpp"
#include "epcomm/error.hpp"
#include "epcomm/event.hpp"
#include "epcomm/limits.hpp"
#include "epcomm/ops.hpp"
#include "epcomm/tensor.hpp"
#include "epcomm/version.hpp"
