// Small helpers shared by the command-line tools.
#pragma once

#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/usage_config.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace sala::tools {

// Lets users write --chunk-size as well as absl's --chunk_size: rewrites dashes in flag
// names (not in values) to underscores, in place.
inline void AcceptDashedFlags(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    char* a = argv[i];
    if (a[0] != '-' || a[1] != '-') continue;
    if (a[2] == '\0') break;  // "--" ends the flags
    for (char* p = a + 2; *p && *p != '='; ++p)
      if (*p == '-') *p = '_';
  }
}

// Makes --help list the tool's flags: Abseil's default looks only in a file named after the
// program.
inline void ListOwnFlagsInHelp() {
  absl::FlagsUsageConfig config;
  auto ours = [](absl::string_view file) { return !absl::StrContains(file, "absl/"); };
  config.contains_help_flags = ours;
  config.contains_helpshort_flags = ours;
  absl::SetFlagsUsageConfig(config);
}

// The whole file ("-": standard input).
inline absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::stringstream ss;
  if (path == "-") {
    ss << std::cin.rdbuf();
    return ss.str();
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  ss << in.rdbuf();
  return ss.str();
}

// Token ids separated by commas or whitespace.
inline absl::StatusOr<std::vector<int>> ParseIds(const std::string& text) {
  std::vector<int> ids;
  for (absl::string_view piece : absl::StrSplit(text, absl::ByAnyChar(", \n\t\r"), absl::SkipEmpty())) {
    int id;
    if (!absl::SimpleAtoi(piece, &id)) return absl::InvalidArgumentError(absl::StrCat("not a token id: '", piece, "'"));
    ids.push_back(id);
  }
  return ids;
}

// Writes a float32 vector as a NumPy .npy file of shape (n,).
inline bool WriteNpy(const std::string& path, const std::vector<float>& v) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(v.size()) + ",), }";
  while ((10 + header.size() + 1) % 64) header.push_back(' ');
  header.push_back('\n');
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return false;
  const unsigned char preamble[8] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
  const unsigned short len = static_cast<unsigned short>(header.size());
  bool ok = std::fwrite(preamble, 1, 8, f) == 8 && std::fwrite(&len, 2, 1, f) == 1 &&
            std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
            std::fwrite(v.data(), 4, v.size(), f) == v.size();
  return std::fclose(f) == 0 && ok;
}

}  // namespace sala::tools
