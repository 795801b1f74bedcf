// SPDX-License-Identifier: Apache-2.0
// Every moekit config example in docs/*.md parses (documentation that tells the truth).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "moekit/io/config.hpp"

namespace {

TEST(DocsConfigs, EveryMoekitConfigExampleParses) {
  const std::filesystem::path docs = std::filesystem::path(MOEKIT_GOLDEN_DIR) / ".." / ".." / "docs";
  int checked = 0;
  for (const char* file : {"routers.md", "config.md", "cli.md", "architecture.md"}) {
    std::ifstream in(docs / file);
    ASSERT_TRUE(in.good()) << (docs / file);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string text = ss.str();
    size_t pos = 0;
    while ((pos = text.find("```json\n", pos)) != std::string::npos) {
      const size_t end = text.find("```", pos + 8);
      ASSERT_NE(end, std::string::npos);
      const std::string block = text.substr(pos + 8, end - pos - 8);
      pos = end + 3;
      if (block.find("\"moekit_config_version\"") == std::string::npos) continue;
      EXPECT_NO_THROW(moekit::parse_layer_config(block, file)) << file << ":\n" << block;
      ++checked;
    }
  }
  EXPECT_GE(checked, 10);
}

}  // namespace
