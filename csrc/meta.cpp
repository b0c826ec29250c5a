// Meta kernels: output shapes and dtypes only, in SymInts, so that fake
// tensors, torch.compile and dynamic shapes see every op. Each runs the same
// argument checks as the real kernels.
#include <torch/library.h>

#include "moe_routing.h"

namespace moe_routing::meta {
namespace {

at::Tensor empty(c10::SymIntArrayRef sizes, const at::Tensor& like, at::ScalarType dtype) {
  return at::empty_symint(sizes, like.options().dtype(dtype));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_meta(
    const at::Tensor& logits, int64_t k, c10::string_view score, std::optional<bool> normalize,
    const std::optional<at::Tensor>& bias, int64_t num_groups, int64_t topk_groups,
    double scale, c10::string_view group_score) {
  (void)normalize, (void)scale;
  detail::parse_score("moe_routing::route", std::string(score));
  detail::parse_group_score("moe_routing::route", std::string(group_score));
  detail::check_route_args(logits, k, bias, num_groups, topk_groups);
  const auto dtype = detail::router_dtype(logits.scalar_type());
  const c10::SymInt T = logits.sym_size(0);
  return {empty({T, k}, logits, dtype), empty({T, k}, logits, at::kLong),
          empty(logits.sym_sizes(), logits, dtype)};
}

at::Tensor route_backward_meta(const at::Tensor& grad_weights,
                               const std::optional<at::Tensor>& grad_scores,
                               const at::Tensor& weights, const at::Tensor& experts,
                               const at::Tensor& scores, c10::string_view score, bool normalize,
                               double scale, at::ScalarType logits_dtype) {
  (void)normalize, (void)scale;
  detail::parse_score("moe_routing::route_backward", std::string(score));
  detail::check_route_backward_args(grad_weights, grad_scores, weights, experts, scores,
                                    logits_dtype);
  return empty(scores.sym_sizes(), scores, logits_dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> plan_meta(
    const at::Tensor& experts, int64_t num_experts, std::optional<c10::SymInt> capacity,
    const std::optional<at::Tensor>& weights, c10::string_view priority,
    const std::optional<at::Tensor>& mask) {
  const auto p = detail::parse_priority("moe_routing::plan", std::string(priority));
  detail::check_plan_args(experts, num_experts, capacity, weights, p, mask);
  return {empty(experts.sym_sizes(), experts, at::kLong),
          empty({c10::SymInt(num_experts)}, experts, at::kLong),
          empty({c10::SymInt(num_experts)}, experts, at::kLong)};
}

at::Tensor dispatch_meta(const at::Tensor& x, const at::Tensor& slots, c10::SymInt num_rows) {
  detail::check_dispatch_args(x, slots, num_rows);
  return empty({num_rows, x.sym_size(1)}, x, x.scalar_type());
}

at::Tensor dispatch_backward_meta(const at::Tensor& grad_out, const at::Tensor& slots) {
  detail::check_dispatch_backward_args(grad_out, slots);
  return empty({slots.sym_size(0), grad_out.sym_size(1)}, grad_out, grad_out.scalar_type());
}

at::Tensor combine_meta(const at::Tensor& expert_out, const at::Tensor& slots,
                        const at::Tensor& weights) {
  detail::check_combine_args(expert_out, slots, weights);
  return empty({slots.sym_size(0), expert_out.sym_size(-1)}, expert_out,
               expert_out.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> combine_backward_meta(const at::Tensor& grad_y,
                                                         const at::Tensor& expert_out,
                                                         const at::Tensor& slots,
                                                         const at::Tensor& weights) {
  detail::check_combine_backward_args(grad_y, expert_out, slots, weights);
  return {empty(expert_out.sym_sizes(), expert_out, expert_out.scalar_type()),
          empty(weights.sym_sizes(), weights, weights.scalar_type())};
}

at::Tensor load_balancing_loss_meta(const at::Tensor& scores, const at::Tensor& experts,
                                    const std::optional<at::Tensor>& mask,
                                    std::optional<c10::SymInt> seq_len) {
  detail::check_load_balancing_args(scores, experts, mask, seq_len);
  return empty({}, scores, scores.scalar_type());
}

at::Tensor load_balancing_loss_backward_meta(const at::Tensor& grad, const at::Tensor& scores,
                                             const at::Tensor& experts,
                                             const std::optional<at::Tensor>& mask,
                                             std::optional<c10::SymInt> seq_len) {
  detail::check_load_balancing_backward_args(grad, scores, experts, mask, seq_len);
  return empty(scores.sym_sizes(), scores, scores.scalar_type());
}

at::Tensor z_loss_meta(const at::Tensor& logits, const std::optional<at::Tensor>& mask) {
  detail::check_z_loss_args("moe_routing::z_loss", logits, mask);
  return empty({}, logits, detail::router_dtype(logits.scalar_type()));
}

at::Tensor z_loss_backward_meta(const at::Tensor& grad, const at::Tensor& logits,
                                const std::optional<at::Tensor>& mask) {
  detail::check_z_loss_backward_args(grad, logits, mask);
  return empty(logits.sym_sizes(), logits, logits.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> expert_choice_meta(const at::Tensor& scores,
                                                      c10::SymInt capacity,
                                                      const std::optional<at::Tensor>& mask) {
  detail::check_expert_choice_args(scores, capacity, mask);
  const c10::SymInt E = scores.sym_size(1);
  return {empty({E, capacity}, scores, scores.scalar_type()), empty({E, capacity}, scores, at::kLong)};
}

at::Tensor expert_choice_backward_meta(const at::Tensor& grad_weights, const at::Tensor& tokens,
                                       c10::SymInt num_tokens) {
  detail::check_expert_choice_backward_args(grad_weights, tokens, num_tokens);
  return empty({num_tokens, tokens.sym_size(0)}, grad_weights, grad_weights.scalar_type());
}

at::Tensor grouped_mm_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& counts) {
  detail::check_grouped_mm_args(x, weight, counts);
  return empty({x.sym_size(0), weight.sym_size(2)}, x, x.scalar_type());
}

at::Tensor balanced_assignment_meta(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                                    int64_t iterations, double epsilon) {
  detail::check_balanced_assignment_args(scores, mask, iterations, epsilon);
  return at::empty_symint({scores.sym_size(0)}, scores.options().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_meta(const at::Tensor& grad,
                                                            const at::Tensor& x,
                                                            const at::Tensor& weight,
                                                            const at::Tensor& counts) {
  detail::check_grouped_mm_backward_args(grad, x, weight, counts);
  return {empty(x.sym_sizes(), x, x.scalar_type()), empty(weight.sym_sizes(), weight, weight.scalar_type())};
}

at::Tensor swiglu_meta(const at::Tensor& h) {
  detail::check_swiglu_args(h);
  return empty({h.sym_size(0), h.sym_size(1) / 2}, h, h.scalar_type());
}

at::Tensor swiglu_backward_meta(const at::Tensor& grad, const at::Tensor& h) {
  detail::check_swiglu_backward_args(grad, h);
  return empty(h.sym_sizes(), h, h.scalar_type());
}

}  // namespace
}  // namespace moe_routing::meta

TORCH_LIBRARY_IMPL(moe_routing, Meta, m) {
  using namespace moe_routing::meta;
  m.impl("route", &route_meta);
  m.impl("route_backward", &route_backward_meta);
  m.impl("plan", &plan_meta);
  m.impl("dispatch", &dispatch_meta);
  m.impl("dispatch_backward", &dispatch_backward_meta);
  m.impl("combine", &combine_meta);
  m.impl("combine_backward", &combine_backward_meta);
  m.impl("load_balancing_loss", &load_balancing_loss_meta);
  m.impl("load_balancing_loss_backward", &load_balancing_loss_backward_meta);
  m.impl("z_loss", &z_loss_meta);
  m.impl("z_loss_backward", &z_loss_backward_meta);
  m.impl("expert_choice", &expert_choice_meta);
  m.impl("expert_choice_backward", &expert_choice_backward_meta);
  m.impl("grouped_mm", &grouped_mm_meta);
  m.impl("grouped_mm_backward", &grouped_mm_backward_meta);
  m.impl("swiglu", &swiglu_meta);
  m.impl("swiglu_backward", &swiglu_backward_meta);
  m.impl("balanced_assignment", &balanced_assignment_meta);
}
