#include "kernel_choice.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace nvembed {

const char* hopper_kernel_choice(const char* env_var, const char* op, bool applies, bool verified) {
  const char* env = std::getenv(env_var);
  const std::string choice = env == nullptr || *env == '\0' ? "auto" : env;
  TORCH_CHECK_VALUE(choice == "auto" || choice == "sm80" || choice == "sm90", "nvembed::", op, ": ", env_var,
                    " must be auto, sm80 or sm90, got '", choice, "'");
  const bool want = choice == "sm90" || (choice == "auto" && verified);
  return applies && want ? "sm90" : "sm80";
}

const char* infonce_fwd_kernel_for(int major, int minor) {
  return hopper_kernel_choice("NVEMBED_INFONCE_KERNEL", "infonce", kBuiltWithSm90a && major == 9 && minor == 0,
                              kInfonceSm90FwdVerified);
}

}  // namespace nvembed
