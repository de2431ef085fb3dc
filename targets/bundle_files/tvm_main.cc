// Runs this bundle's TVM library (model.so) on the TVM runtime: the C++ counterpart of edgesmith_runtime.py.
//
//   tvm_main model.so input.bin 1 1 28 28     # float32 input, raw little-endian, already normalised (see
//                                             # manifest.json "inputs"); prints the first output as float32 text
//
// Build it against the TVM runtime of the same TVM version that compiled model.so (CMakeLists.txt next to this file
// finds the headers and libraries of the `apache-tvm` Python wheel; on a device, use its libtvm_runtime.so).
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <vector>

// Host memory for the input tensor, freed when the tensor's last reference goes.
struct HostAllocator {
  void AllocData(DLTensor* tensor) {
    size_t size = (tvm::ffi::GetDataSize(*tensor) + 63) / 64 * 64;
    tensor->data = std::aligned_alloc(64, size);
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s model.so input.bin DIM [DIM ...]\n", argv[0]);
    return 2;
  }
  std::vector<int64_t> shape;
  int64_t count = 1;
  for (int i = 3; i < argc; ++i) {
    shape.push_back(std::atoll(argv[i]));
    count *= shape.back();
  }
  std::ifstream file(argv[2], std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (bytes.size() != static_cast<size_t>(count) * sizeof(float)) {
    std::fprintf(stderr, "error: %s holds %zu bytes, the shape needs %lld float32 values\n", argv[2], bytes.size(),
                 static_cast<long long>(count));
    return 2;
  }

  // The library holds a Relax VM executable: load it, then set the VM up on the CPU with the pooled allocator.
  tvm::ffi::Module library = tvm::ffi::Module::LoadFromFile(argv[1]);
  tvm::ffi::Module vm = library->GetFunction("vm_load_executable").value()().cast<tvm::ffi::Module>();
  const int kPooledAllocator = 2;
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);

  DLDevice cpu{kDLCPU, 0};
  tvm::ffi::Tensor input = tvm::ffi::Tensor::FromNDAlloc(HostAllocator(), tvm::ffi::Shape(shape),
                                                         DLDataType{kDLFloat, 32, 1}, cpu);
  std::memcpy(input.data_ptr(), bytes.data(), bytes.size());

  tvm::ffi::Any result = vm->GetFunction("main").value()(input);
  tvm::ffi::Tensor output = result.cast<tvm::ffi::Tensor>();   // models with one output, on the CPU
  const float* values = static_cast<const float*>(output.data_ptr());
  for (int64_t i = 0; i < output.numel(); ++i) std::printf("%.7g\n", values[i]);
  return 0;
}
