#include "kernel_choice.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace nvembed {

std::string env_choice(const char* env_var, const char* op, std::initializer_list<std::string_view> allowed) {
  const char* env = std::getenv(env_var);
  std::string choice = env == nullptr || *env == '\0' ? "auto" : env;
  bool ok = choice == "auto";
  std::string names = "auto";
  size_t i = 0;
  for (const std::string_view a : allowed) {
    ok = ok || choice == a;
    names += ++i == allowed.size() ? " or " : ", ";
    names += a;
  }
  TORCH_CHECK_VALUE(ok, "nvembed::", op, ": ", env_var, " must be ", names, ", got '", choice, "'");
  return choice;
}

const char* kernel_choice(const char* env_var, const char* op, const char* base, const char* alt, bool applies,
                          bool verified) {
  const std::string choice = env_choice(env_var, op, {base, alt});
  const bool want = choice == alt || (choice == "auto" && verified);
  return applies && want ? alt : base;
}

const char* hopper_kernel_choice(const char* env_var, const char* op, bool applies, bool verified) {
  return kernel_choice(env_var, op, "sm80", "sm90", applies, verified);
}

const char* infonce_fwd_kernel_for(int major, int minor) {
  return hopper_kernel_choice("NVEMBED_INFONCE_KERNEL", "infonce", kBuiltWithSm90a && major == 9 && minor == 0,
                              kInfonceSm90FwdVerified);
}

}  // namespace nvembed
