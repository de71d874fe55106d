# Low-latency GPU tests (included from tests/gpu/CMakeLists.txt; need NVSHMEM). Targets carry a
# `gpu` in their name: tests/cpu has test_low_latency* too.
if(EPCOMM_HAS_NVSHMEM)
  add_library(epcomm_ll_gpu_support STATIC ll_support.cpp ll_fake_expert.cu)
  target_include_directories(epcomm_ll_gpu_support PUBLIC ${CMAKE_CURRENT_SOURCE_DIR})
  target_link_libraries(epcomm_ll_gpu_support PUBLIC epcomm_test_support epcomm epcomm_internal CUDA::cudart
                                                     GTest::gtest)
  foreach(pair test_gpu_low_latency:test_low_latency test_gpu_low_latency_faults:test_low_latency_faults
               test_gpu_low_latency_coexistence:test_low_latency_coexistence
               test_gpu_low_latency_put_path:test_low_latency_put_path
               perf_gpu_low_latency:test_low_latency_timing)
    string(REPLACE ":" ";" pair ${pair})
    list(GET pair 0 target)
    list(GET pair 1 source)
    epcomm_add_gpu_test(${target} ${source}.cpp)
    target_link_libraries(${target} PRIVATE epcomm_ll_gpu_support)
  endforeach()
  target_link_libraries(test_gpu_low_latency PRIVATE ${CMAKE_DL_LIBS})  # NVML, opened at run time
endif()
