// The writers' made-ahead pipeline (formats/src/made_ahead.h): order, skipping, failures and
// early destruction.
#include <catch2/catch.hpp>

#include <atomic>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "made_ahead.h"

using lorakit::formats::MadeAhead;

TEST_CASE("MadeAhead makes the needed items once each, in order, on one helper", "[made_ahead]") {
    const std::size_t count = 200;
    std::atomic<int> calls{0};
    std::vector<std::thread::id> makers(count);
    auto needs = [](std::size_t i) { return i % 3 != 0; };
    auto make = [&](std::size_t i) {
        ++calls;
        makers[i] = std::this_thread::get_id();
        return std::make_unique<std::string>(std::to_string(i * i));  // move-only, like the writers' buffers
    };
    int expected_calls = 0;
    {
        MadeAhead<std::unique_ptr<std::string>> made(count, needs, make);
        for (std::size_t i = 0; i < count; ++i) {
            if (!needs(i)) continue;
            ++expected_calls;
            CHECK(*made.take(i) == std::to_string(i * i));
        }
    }
    CHECK(calls == expected_calls);
    std::thread::id helper;
    for (std::size_t i = 0; i < count; ++i) {
        if (!needs(i)) continue;
        if (helper == std::thread::id{}) helper = makers[i];
        CHECK(makers[i] == helper);  // one thread for the whole sequence
    }
    CHECK(helper != std::this_thread::get_id());
}

TEST_CASE("MadeAhead: skipped, unknown and passed items are made at once; nothing runs ahead unbounded", "[made_ahead]") {
    std::atomic<int> made_count{0};
    auto make = [&](std::size_t i) {
        ++made_count;
        return static_cast<int>(i) * 10;
    };
    MadeAhead<int> made(10, [](std::size_t i) { return i >= 2; }, make, 2);
    CHECK(made.take(0) == 0);  // not a needed item: made now
    CHECK(made.take(5) == 50);  // 2..4 skipped by the caller
    CHECK(made.take(3) == 30);  // already passed: made now
    CHECK(made.take(6) == 60);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    // 2..6 made by the helper, 0 and 3 by the caller, and at most depth = 2 beyond item 6.
    CHECK(made_count <= 5 + 2 + 2);
    CHECK(made.take(9) == 90);
}

TEST_CASE("MadeAhead rethrows a failure at the item that failed, and stops making", "[made_ahead]") {
    std::atomic<int> calls{0};
    auto make = [&](std::size_t i) {
        ++calls;
        if (i == 4) throw std::runtime_error("item 4 failed");
        return i;
    };
    MadeAhead<std::size_t> made(10, [](std::size_t) { return true; }, make);
    for (std::size_t i = 0; i < 4; ++i) CHECK(made.take(i) == i);
    CHECK_THROWS_WITH(made.take(4), "item 4 failed");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CHECK(calls == 5);  // nothing after the failure
    CHECK(made.take(5) == 5);  // a later item is made at once by the caller
}

TEST_CASE("MadeAhead destroyed before everything is taken stops its helper", "[made_ahead]") {
    std::atomic<int> calls{0};
    {
        MadeAhead<int> made(1000, [](std::size_t) { return true; }, [&](std::size_t i) {
            ++calls;
            return static_cast<int>(i);
        });
        CHECK(made.take(0) == 0);
    }  // joins here: a hang would fail the test by timeout
    CHECK(calls < 1000);
    MadeAhead<int> none(5, [](std::size_t) { return false; }, [](std::size_t i) { return static_cast<int>(i); });
    CHECK(none.take(3) == 3);
}
