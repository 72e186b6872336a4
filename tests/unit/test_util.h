// Helpers shared by the unit tests.
#pragma once

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>

#include "gtest/gtest.h"
#include "sala/config.h"

namespace sala::testing {

// The small built-in model written by the `make_test_model` CTest fixture.
inline std::string TestModelDir() {
  const char* dir = std::getenv("SALA_TEST_MODEL");
  return dir ? dir : "";
}

#define SALA_REQUIRE_TEST_MODEL()                                              \
  do {                                                                         \
    if (::sala::testing::TestModelDir().empty())                               \
      GTEST_FAIL() << "SALA_TEST_MODEL is not set (run the tests through ctest)"; \
  } while (0)

// A fixture holding the test model's config (tests that need its shapes, not its weights).
class TestModelConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SALA_REQUIRE_TEST_MODEL();
    auto c = LoadModelConfig(TestModelDir());
    ASSERT_TRUE(c.ok()) << c.status();
    config_ = *c;
  }
  ModelConfig config_;
};

inline std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

// A fresh directory under the test's temp dir.
inline std::string ScratchDir(const std::string& name) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::filesystem::path dir = std::filesystem::temp_directory_path() /
                              ("sala-" + std::string(info->test_suite_name()) + "-" + info->name() + "-" + name +
                               "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

// Copies the test model so that a test may break one of its files.
inline std::string CopyOfTestModel(const std::string& name) {
  const std::string dir = ScratchDir(name);
  std::filesystem::copy(TestModelDir(), dir,
                        std::filesystem::copy_options::recursive | std::filesystem::copy_options::overwrite_existing);
  return dir;
}

inline std::vector<int> RandomTokens(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(3, vocab - 1);
  std::vector<int> ids(n);
  for (int& t : ids) t = d(rng);
  return ids;
}

// max |a − b| / max |b|; a NaN in `a` counts as infinitely wrong.
inline double RelativeError(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i])) return INFINITY;
    num = std::max(num, std::abs(double(a[i]) - b[i]));
    den = std::max(den, std::abs(double(b[i])));
  }
  return den > 0 ? num / den : num;
}

}  // namespace sala::testing
