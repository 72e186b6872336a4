#include "sala/tokenizer.h"

#include <fstream>
#include <random>
#include <sstream>

#include "gtest/gtest.h"
#include "test_util.h"

namespace sala {
namespace {

class TokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SALA_REQUIRE_TEST_MODEL();
    auto t = Tokenizer::Load(testing::TestModelDir());
    ASSERT_TRUE(t.ok()) << t.status();
    tok_ = std::move(*t);
  }
  std::unique_ptr<Tokenizer> tok_;
};

bool IsValidUtf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (int k = 1; k < len; ++k)
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    i += len;
  }
  return true;
}

const std::vector<std::string> kTexts = {
    "The router counts its tokens.",
    "  leading spaces and\ttabs\nand new lines\n\n",
    "Grüße aus München. Добрый день. 你好，世界。🙂🚀",
    "digits 1048576 and symbols {}[]<>|\\~`",
    "unseen words: zyxwvut quokka ßß ∮ ⨌",
};

TEST_F(TokenizerTest, RoundTripsText) {
  for (const std::string& text : kTexts) {
    const std::vector<int> ids = tok_->Encode(text);
    EXPECT_FALSE(ids.empty());
    EXPECT_EQ(tok_->Decode(ids), text);
  }
}

// Our BPE segmentation must equal SentencePiece's own (Debian's spm_encode) id for id.
TEST_F(TokenizerTest, MatchesSentencePieceItself) {
  std::vector<std::string> lines;
  std::ifstream corpus(std::string(SALA_SOURCE_DIR) + "/tools/mkmodel/corpus.txt");
  for (std::string line; std::getline(corpus, line);) lines.push_back(line);
  const std::vector<std::string> alphabet = {"a", "e", "th", " ", "  ", "ing", "ü", "ß", "д", "你", "界", "🙂",
                                             "1", "9", ".", ",", "{", "\t", "é", "ñ", "Q", "x", "z", "-"};
  std::mt19937 rng(1);
  for (int i = 0; i < 300; ++i) {
    std::string line;
    const int n = 1 + int(rng() % 40);
    for (int k = 0; k < n; ++k) line += alphabet[rng() % alphabet.size()];
    lines.push_back(line);
  }
  const std::string dir = testing::ScratchDir("spm");
  {
    std::ofstream in(dir + "/in.txt");
    for (const auto& l : lines) in << l << "\n";
  }
  const std::string cmd = "spm_encode --model=" + testing::TestModelDir() + "/tokenizer.model --output_format=id < " +
                          dir + "/in.txt > " + dir + "/out.txt";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << "spm_encode (Debian package sentencepiece) is needed";
  std::ifstream out(dir + "/out.txt");
  size_t i = 0;
  for (std::string line; std::getline(out, line); ++i) {
    ASSERT_LT(i, lines.size());
    std::vector<int> expect;
    std::istringstream ss(line);
    for (int id; ss >> id;) expect.push_back(id);
    EXPECT_EQ(tok_->Encode(lines[i]), expect) << "line " << i << ": '" << lines[i] << "'";
  }
  EXPECT_EQ(i, lines.size());
}

TEST_F(TokenizerTest, RefusesCorruptModelFiles) {
  const std::string dir = testing::CopyOfTestModel("corrupt-spm");
  const std::string good = testing::ReadAll(dir + "/tokenizer.model");
  std::mt19937 rng(2);
  for (int i = 0; i < 100; ++i) {
    std::string bytes = good;
    if (i % 2) bytes.resize(rng() % bytes.size());
    else for (int k = 0; k < 5; ++k) bytes[rng() % bytes.size()] = char(rng());
    testing::WriteAll(dir + "/tokenizer.model", bytes);
    auto t = Tokenizer::Load(dir);  // an error or a usable tokenizer, never a crash
    if (t.ok()) (*t)->Decode((*t)->Encode("probe text"));
  }
  testing::WriteAll(dir + "/tokenizer.model", "");
  EXPECT_FALSE(Tokenizer::Load(dir).ok());
}

// A byte piece whose text is not "<0xAB>" makes the model corrupt: not an exception, a write out
// of bounds, or a lenient reading. The replacements keep the length, so the protobuf stays
// well-formed and only the piece's text is wrong.
TEST_F(TokenizerTest, RefusesMalformedBytePieces) {
  const std::string dir = testing::CopyOfTestModel("bad-byte-piece");
  const std::string good = testing::ReadAll(dir + "/tokenizer.model");
  const size_t at = good.find("<0x41>");
  ASSERT_NE(at, std::string::npos) << "the test model has byte fallback";
  for (const char* bad : {"<0xZZ>", "<0x-1>", "<0x 4>", "<0x4A)"}) {
    std::string bytes = good;
    bytes.replace(at, 6, bad);
    testing::WriteAll(dir + "/tokenizer.model", bytes);
    auto t = Tokenizer::Load(dir);
    ASSERT_FALSE(t.ok()) << bad;
    EXPECT_NE(t.status().message().find("byte piece"), std::string::npos) << t.status();
  }
  testing::WriteAll(dir + "/tokenizer.model", good);
  auto t = Tokenizer::Load(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->Decode((*t)->Encode("caf\xC3\xA9 \xE2\x9C\x93")), "caf\xC3\xA9 \xE2\x9C\x93");
}

TEST_F(TokenizerTest, SpecialTokensAndChatTemplate) {
  const int im_start = tok_->TokenId("<|im_start|>"), im_end = tok_->TokenId("<|im_end|>");
  ASSERT_GT(im_start, 0);
  ASSERT_EQ(im_end + 1, im_start);
  auto ids = tok_->EncodeChat({{"system", "Be brief."}, {"user", "Hello"}});
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ((*ids)[0], 1);  // BOS
  EXPECT_EQ((*ids)[1], im_start);
  EXPECT_EQ(std::count(ids->begin(), ids->end(), im_start), 3);
  EXPECT_EQ(std::count(ids->begin(), ids->end(), im_end), 2);
  EXPECT_EQ(tok_->Decode(*ids, /*skip_special=*/false),
            "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(tok_->Decode(*ids), "system\nBe brief.\nuser\nHello\nassistant\n");
  EXPECT_FALSE(tok_->EncodeChat({{"wizard", "x"}}).ok());
  EXPECT_FALSE(tok_->EncodeChat({}).ok());
}

TEST_F(TokenizerTest, StreamingNeverSplitsACharacter) {
  for (const std::string& text : kTexts) {
    StreamDecoder d(*tok_);
    std::string streamed;
    for (int id : tok_->Encode(text)) {
      const std::string piece = d.Push(id);
      EXPECT_TRUE(IsValidUtf8(piece)) << "half a character emitted for '" << text << "'";
      streamed += piece;
    }
    streamed += d.Flush();
    EXPECT_EQ(streamed, text);
  }
}

TEST_F(TokenizerTest, InvalidByteSequencesBecomeReplacementCharacters) {
  // Byte-fallback pieces for 0xE4 0xBD (an unfinished 3-byte character) then 'a'.
  std::vector<int> ids;
  for (int id = 0; id < tok_->vocab_size(); ++id) {
    const std::string b = tok_->TokenBytes(id);
    if (b == "\xE4" || b == "\xBD") ids.push_back(id);
  }
  ASSERT_EQ(ids.size(), 2u);
  if (tok_->TokenBytes(ids[0]) != "\xE4") std::swap(ids[0], ids[1]);
  StreamDecoder d(*tok_);
  EXPECT_EQ(d.Push(ids[0]), "");  // may still complete
  EXPECT_EQ(d.Push(ids[1]), "");
  std::string rest;
  for (int id : tok_->Encode("a")) rest += d.Push(id);
  rest += d.Flush();
  EXPECT_EQ(rest, "\xEF\xBF\xBD\xEF\xBF\xBD a");  // not at the start: the piece keeps its space
  EXPECT_EQ(d.Flush(), "");
}

TEST_F(TokenizerTest, OutOfRangeIdsDecodeToNothing) {
  EXPECT_EQ(tok_->TokenBytes(-5), "");
  EXPECT_EQ(tok_->TokenBytes(1 << 30), "");
}

}  // namespace
}  // namespace sala
