# Low-latency GPU tests (included from tests/gpu/CMakeLists.txt; need NVSHMEM).
if(EPCOMM_HAS_NVSHMEM)
  add_library(epcomm_ll_test_support STATIC ll_support.cpp ll_fake_expert.cu)
  target_include_directories(epcomm_ll_test_support PUBLIC ${CMAKE_CURRENT_SOURCE_DIR})
  target_link_libraries(epcomm_ll_test_support PUBLIC epcomm_test_support epcomm epcomm_internal CUDA::cudart
                                                      GTest::gtest)
  foreach(name test_low_latency test_low_latency_faults test_low_latency_coexistence test_low_latency_timing)
    epcomm_add_gpu_test(${name} ${name}.cpp)
    target_link_libraries(${name} PRIVATE epcomm_ll_test_support)
  endforeach()
endif()
