// The few DLPack (v0.8-compatible, "legacy" capsule) structures epcomm needs to hand memory it owns
// to torch.from_dlpack, written from the public DLPack specification. Layout must match the spec.
#pragma once

#include <cstdint>

namespace epcomm::python::dlpack {

// DLDeviceType values used here.
constexpr int32_t kDeviceCPU = 1;
constexpr int32_t kDeviceCUDA = 2;

// DLDataTypeCode values used here.
constexpr uint8_t kCodeUInt = 1;

struct Device {
  int32_t device_type;  // a C enum in the spec: int-sized
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; nullptr means row-major
  uint64_t byte_offset;
};

struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

// The capsule names of the protocol: a fresh capsule, and one a consumer has taken over.
constexpr const char* kCapsuleName = "dltensor";
constexpr const char* kUsedCapsuleName = "used_dltensor";

}  // namespace epcomm::python::dlpack
