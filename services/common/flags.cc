#include "flags.h"

#include <cstdlib>
#include <iostream>

#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"

namespace sala::service {

void ParseFlags(int argc, char** argv, const std::string& usage) {
  absl::SetProgramUsageMessage(usage + "\nEvery flag --name may also be set as the environment variable SALA_NAME.");
  // --help lists this project's flags. Abseil's default looks only in a file named after the
  // program, and ours live in main.cc and the shared services/common.
  absl::FlagsUsageConfig config;
  auto ours = [](absl::string_view file) { return !absl::StrContains(file, "absl/"); };
  config.contains_help_flags = ours;
  config.contains_helpshort_flags = ours;
  absl::SetFlagsUsageConfig(config);
  for (int i = 1; i < argc; ++i) {
    char* a = argv[i];
    if (a[0] != '-' || a[1] != '-' || a[2] == '\0') continue;
    for (char* p = a + 2; *p && *p != '='; ++p)
      if (*p == '-') *p = '_';
  }
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    const std::string env = "SALA_" + absl::AsciiStrToUpper(name);
    if (const char* value = std::getenv(env.c_str())) {
      std::string error;
      if (!flag->ParseFrom(value, &error)) {
        std::cerr << "bad value for " << env << ": " << error << "\n";
        std::exit(2);
      }
    }
  }
  absl::ParseCommandLine(argc, argv);
}

}  // namespace sala::service
