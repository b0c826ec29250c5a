// Autocast kernels: under torch.autocast, grouped_mm runs in the autocast
// dtype as torch's own matrix products do (its float32/float16/bfloat16 x
// and weight are cast; float64 stays), so a dropless layer gets the same
// precision and tensor cores as the capacity layer's torch.bmm. The other ops
// move or reduce data in their inputs' dtype and take no autocast kernel.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "moe_routing.h"

namespace moe_routing {
namespace {

template <c10::DeviceType device>
at::Tensor grouped_mm_autocast(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& counts) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  return grouped_mm(at::autocast::cached_cast(dtype, x, device),
                    at::autocast::cached_cast(dtype, weight, device), counts);
}

}  // namespace
}  // namespace moe_routing

TORCH_LIBRARY_IMPL(moe_routing, AutocastCPU, m) {
  m.impl("grouped_mm", &moe_routing::grouped_mm_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(moe_routing, AutocastCUDA, m) {
  m.impl("grouped_mm", &moe_routing::grouped_mm_autocast<c10::DeviceType::CUDA>);
}
