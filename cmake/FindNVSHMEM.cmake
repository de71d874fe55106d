# Finds NVSHMEM: $NVSHMEM_DIR / -DNVSHMEM_DIR, else the pip package nvidia-nvshmem-cu13 of the
# python3 on the PATH. Defines NVSHMEM::host (shared) and NVSHMEM::device (static, device code).
set(_nvshmem_hints ${NVSHMEM_DIR} $ENV{NVSHMEM_DIR})
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  execute_process(
    COMMAND ${Python3_EXECUTABLE} -c "import nvidia.nvshmem as m, os; print(os.path.dirname(m.__file__) if m.__file__ else list(m.__path__)[0])"
    OUTPUT_VARIABLE _nvshmem_pip OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(_nvshmem_pip)
    list(APPEND _nvshmem_hints ${_nvshmem_pip})
  endif()
endif()

find_path(NVSHMEM_INCLUDE_DIR nvshmem.h HINTS ${_nvshmem_hints} PATH_SUFFIXES include)
find_library(NVSHMEM_HOST_LIBRARY NAMES nvshmem_host libnvshmem_host.so.3 HINTS ${_nvshmem_hints} PATH_SUFFIXES lib lib64)
find_library(NVSHMEM_DEVICE_LIBRARY NAMES nvshmem_device libnvshmem_device.a HINTS ${_nvshmem_hints} PATH_SUFFIXES lib lib64)

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(NVSHMEM REQUIRED_VARS NVSHMEM_INCLUDE_DIR NVSHMEM_HOST_LIBRARY NVSHMEM_DEVICE_LIBRARY)

if(NVSHMEM_FOUND AND NOT TARGET NVSHMEM::host)
  get_filename_component(NVSHMEM_LIBRARY_DIR ${NVSHMEM_HOST_LIBRARY} DIRECTORY)
  add_library(NVSHMEM::host SHARED IMPORTED)
  set_target_properties(NVSHMEM::host PROPERTIES IMPORTED_LOCATION ${NVSHMEM_HOST_LIBRARY}
                                                 INTERFACE_INCLUDE_DIRECTORIES ${NVSHMEM_INCLUDE_DIR})
  add_library(NVSHMEM::device STATIC IMPORTED)
  set_target_properties(NVSHMEM::device PROPERTIES IMPORTED_LOCATION ${NVSHMEM_DEVICE_LIBRARY}
                                                   INTERFACE_INCLUDE_DIRECTORIES ${NVSHMEM_INCLUDE_DIR})
endif()
