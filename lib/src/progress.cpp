#include "lorakit/progress.h"

namespace lorakit {

NoProgress& no_progress() noexcept {
    static NoProgress instance;
    return instance;
}

}  // namespace lorakit
