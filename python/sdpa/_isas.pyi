# Stub of the module CMakeLists.txt generates at build time (sdpa_add_kernel): the kernel
# variants of the build, best first, each with the CPU features it needs.
ISAS: dict[str, tuple[str, ...]]
