#include "kernel_choice.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace nvembed {

const char* kernel_choice(const char* env_var, const char* op, const char* base, const char* alt, bool applies,
                          bool verified) {
  const char* env = std::getenv(env_var);
  const std::string choice = env == nullptr || *env == '\0' ? "auto" : env;
  TORCH_CHECK_VALUE(choice == "auto" || choice == base || choice == alt, "nvembed::", op, ": ", env_var,
                    " must be auto, ", base, " or ", alt, ", got '", choice, "'");
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
