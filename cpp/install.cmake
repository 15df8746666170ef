# Installs the C++ side of fastsgd so other CMake projects can use it:
#   headers        <includedir>/fastsgd/*.h
#   library        <libdir>/libfastsgd_core.a, or .so with FASTSGD_SHARED  (target fastsgd::fastsgd)
#   CMake package  <cmakedir>/fastsgd{Config,ConfigVersion,Targets}.cmake
# Included at the end of cpp/CMakeLists.txt; does nothing unless FASTSGD_INSTALL is ON.
#
# Two layouts:
#   plain `cmake --install`  include/, lib/, lib/cmake/fastsgd/       (GNUInstallDirs)
#   the Python wheel         fastsgd/include, fastsgd/lib, fastsgd/share/cmake/fastsgd
#     (scikit-build-core defines SKBUILD and installs into the wheel root; the files land
#      inside the package, next to fastsgd/_core*.so, where fastsgd.get_cmake_dir() and
#      fastsgd.get_include() find them, and where CMake's own search finds them when
#      site-packages is on CMAKE_PREFIX_PATH: <prefix>/<name>*/share/cmake/<name>*/).
# Each destination can be overridden with the cache variables below.
if(NOT FASTSGD_INSTALL)
  return()
endif()

include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

if(SKBUILD)
  set(_fastsgd_includedir "fastsgd/include")
  set(_fastsgd_libdir "fastsgd/lib")
  set(_fastsgd_cmakedir "fastsgd/share/cmake/fastsgd")
else()
  set(_fastsgd_includedir "${CMAKE_INSTALL_INCLUDEDIR}")
  set(_fastsgd_libdir "${CMAKE_INSTALL_LIBDIR}")
  set(_fastsgd_cmakedir "${CMAKE_INSTALL_LIBDIR}/cmake/fastsgd")
endif()
set(FASTSGD_INSTALL_INCLUDEDIR "${_fastsgd_includedir}" CACHE STRING "fastsgd: where headers are installed (relative to the prefix)")
set(FASTSGD_INSTALL_LIBDIR "${_fastsgd_libdir}" CACHE STRING "fastsgd: where libfastsgd_core.a is installed (relative to the prefix)")
set(FASTSGD_INSTALL_CMAKEDIR "${_fastsgd_cmakedir}" CACHE STRING "fastsgd: where the CMake package files are installed (relative to the prefix)")
mark_as_advanced(FASTSGD_INSTALL_INCLUDEDIR FASTSGD_INSTALL_LIBDIR FASTSGD_INSTALL_CMAKEDIR)

# The installed target's include directory follows FASTSGD_INSTALL_INCLUDEDIR (the INCLUDES
# DESTINATION below); any $<INSTALL_INTERFACE:...> set where the target is defined would point
# at <prefix>/include, which does not exist inside the wheel, so it is dropped here.
get_target_property(_fastsgd_inc fastsgd_core INTERFACE_INCLUDE_DIRECTORIES)
if(_fastsgd_inc)
  list(FILTER _fastsgd_inc EXCLUDE REGEX "^\\$<INSTALL_INTERFACE:")
  set_property(TARGET fastsgd_core PROPERTY INTERFACE_INCLUDE_DIRECTORIES "${_fastsgd_inc}")
endif()

install(DIRECTORY "${CMAKE_CURRENT_LIST_DIR}/include/fastsgd"
        DESTINATION "${FASTSGD_INSTALL_INCLUDEDIR}"
        COMPONENT fastsgd_development
        FILES_MATCHING PATTERN "*.h")
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/include/fastsgd/version.h"
        DESTINATION "${FASTSGD_INSTALL_INCLUDEDIR}/fastsgd"
        COMPONENT fastsgd_development)

# Link dependencies travel with the exported target: Threads::Threads (PUBLIC) and, for a static
# CUDA build, $<LINK_ONLY:CUDA::cudart_static> (a PRIVATE dependency of a static library still has
# to reach the final link line; install(EXPORT) writes it as LINK_ONLY). A shared library has the
# runtime linked in already. fastsgdConfig.cmake finds those packages again before it loads the
# targets. The shared library has no SONAME version: a wheel cannot hold the symlinks.
install(TARGETS fastsgd_core
        EXPORT fastsgdTargets
        ARCHIVE DESTINATION "${FASTSGD_INSTALL_LIBDIR}" COMPONENT fastsgd_development
        LIBRARY DESTINATION "${FASTSGD_INSTALL_LIBDIR}" COMPONENT fastsgd_runtime
        RUNTIME DESTINATION "${FASTSGD_INSTALL_LIBDIR}" COMPONENT fastsgd_runtime
        INCLUDES DESTINATION "${FASTSGD_INSTALL_INCLUDEDIR}")

install(EXPORT fastsgdTargets
        NAMESPACE fastsgd::
        FILE fastsgdTargets.cmake
        DESTINATION "${FASTSGD_INSTALL_CMAKEDIR}"
        COMPONENT fastsgd_development)

# Values substituted into fastsgdConfig.cmake.
if(FASTSGD_HAVE_CUDA)
  set(FASTSGD_CONFIG_HAVE_CUDA ON)
else()
  set(FASTSGD_CONFIG_HAVE_CUDA OFF)
endif()
if(FASTSGD_SHARED)
  set(FASTSGD_CONFIG_SHARED ON)
else()
  set(FASTSGD_CONFIG_SHARED OFF)
endif()
set(_fastsgd_pkg "${CMAKE_CURRENT_BINARY_DIR}/fastsgd-package")
configure_package_config_file(
  "${CMAKE_CURRENT_LIST_DIR}/../cmake/fastsgdConfig.cmake.in"
  "${_fastsgd_pkg}/fastsgdConfig.cmake"
  INSTALL_DESTINATION "${FASTSGD_INSTALL_CMAKEDIR}"
  PATH_VARS FASTSGD_INSTALL_INCLUDEDIR)
# Not ARCH_INDEPENDENT: the package holds a compiled library for this architecture.
write_basic_package_version_file(
  "${_fastsgd_pkg}/fastsgdConfigVersion.cmake"
  VERSION "${fastsgd_VERSION}"
  COMPATIBILITY SameMajorVersion)
install(FILES "${_fastsgd_pkg}/fastsgdConfig.cmake" "${_fastsgd_pkg}/fastsgdConfigVersion.cmake"
        DESTINATION "${FASTSGD_INSTALL_CMAKEDIR}"
        COMPONENT fastsgd_development)
