// Command-line flags with environment-variable twins: every flag --foo_bar can also be given
// as SALA_FOO_BAR; the command line wins. Dashes and underscores are both accepted.
#pragma once

#include <string>

namespace sala::service {

void ParseFlags(int argc, char** argv, const std::string& usage);

}  // namespace sala::service
