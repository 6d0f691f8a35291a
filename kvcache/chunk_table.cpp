// ChunkTable: the slot -> chunk tables of one cache, kept equal to its VirtualRange's mappings.
#include "kvcache/chunk_table.h"

#include <map>

namespace glake::kvcache {
namespace {

std::string where(int slot, std::int64_t index) {
  return "slot " + std::to_string(slot) + " index " + std::to_string(index);
}

}  // namespace

ChunkTable::ChunkTable(Driver& driver, int device, const KvLayout& layout)
    : layout_(layout),
      range_(std::make_shared<VirtualRange>(driver, device, layout.total_bytes())),
      rows_(layout.max_seqs),
      counts_(layout.max_seqs, 0),
      ready_(layout.max_seqs, 0) {}

const ChunkPtr& ChunkTable::chunk(int slot, std::int64_t index) const {
  static const ChunkPtr none;
  const auto& row = rows_[slot];
  return index >= 0 && index < static_cast<std::int64_t>(row.size()) ? row[index] : none;
}

bool ChunkTable::is_shared(int slot, std::int64_t index) const {
  const ChunkPtr& c = chunk(slot, index);
  return c && refs(c->id()) > 1;
}

int ChunkTable::refs(std::uint64_t id) const {
  auto it = refs_.find(id);
  return it == refs_.end() ? 0 : it->second;
}

std::vector<std::int64_t> ChunkTable::indices(int slot) const {
  std::vector<std::int64_t> out;
  const auto& row = rows_[slot];
  for (std::size_t i = 0; i < row.size(); ++i) {
    if (row[i]) out.push_back(static_cast<std::int64_t>(i));
  }
  return out;
}

std::vector<std::int64_t> ChunkTable::exclusive_indices(int slot) const {
  std::vector<std::int64_t> out;
  const auto& row = rows_[slot];
  for (std::size_t i = 0; i < row.size(); ++i) {
    if (row[i] && refs(row[i]->id()) == 1) out.push_back(static_cast<std::int64_t>(i));
  }
  return out;
}

std::vector<std::int64_t> ChunkTable::holes(int slot, std::int64_t upto) const {
  std::vector<std::int64_t> out;
  for (std::int64_t i = 0; i < upto; ++i) {
    if (!chunk(slot, i)) out.push_back(i);
  }
  return out;
}

std::size_t ChunkTable::shared_chunks() const {
  std::size_t n = 0;
  for (const auto& [id, r] : refs_) n += r > 1;
  return n;
}

void ChunkTable::map_run(int slot, std::int64_t first, const std::vector<ChunkPtr>& chunks) {
  const std::int64_t last = first + static_cast<std::int64_t>(chunks.size());
  if (last > layout_.chunks_per_slot()) {
    throw Error("ChunkTable::map_run(" + where(slot, last - 1) + "): beyond the slot's " +
                std::to_string(layout_.chunks_per_slot()) + " chunks");
  }
  for (std::int64_t i = first; i < last; ++i) {
    if (chunk(slot, i)) throw Error("ChunkTable::map_run(" + where(slot, i) + "): already mapped");
  }
  range_->map_many(layout_.chunk_offset(slot, first), chunks);
  auto& row = rows_[slot];
  if (static_cast<std::int64_t>(row.size()) < last) row.resize(last);
  for (std::size_t k = 0; k < chunks.size(); ++k) {
    row[first + k] = chunks[k];
    ++refs_[chunks[k]->id()];
  }
  counts_[slot] += static_cast<int>(chunks.size());
  mapped_total_ += chunks.size();
  std::int64_t r = ready_[slot];
  while (r < static_cast<std::int64_t>(row.size()) && row[r]) ++r;
  ready_[slot] = r;
}

void ChunkTable::map_at(int slot, const std::vector<std::int64_t>& indices, const std::vector<ChunkPtr>& chunks) {
  if (indices.size() != chunks.size()) {
    throw InvalidArgumentError("ChunkTable::map_at: " + std::to_string(indices.size()) + " indices for " +
                               std::to_string(chunks.size()) + " chunks");
  }
  std::size_t k = 0;
  while (k < indices.size()) {
    std::size_t j = k + 1;
    while (j < indices.size() && indices[j] == indices[j - 1] + 1) ++j;
    map_run(slot, indices[k], std::vector<ChunkPtr>(chunks.begin() + k, chunks.begin() + j));
    k = j;
  }
}

ChunkPtr ChunkTable::unmap(int slot, std::int64_t index) {
  ChunkPtr c = chunk(slot, index);
  if (!c) throw Error("ChunkTable::unmap(" + where(slot, index) + "): not mapped");
  range_->unmap(layout_.chunk_offset(slot, index));
  auto& row = rows_[slot];
  row[index].reset();
  while (!row.empty() && !row.back()) row.pop_back();
  auto it = refs_.find(c->id());
  if (--it->second == 0) refs_.erase(it);
  --counts_[slot];
  --mapped_total_;
  if (index < ready_[slot]) ready_[slot] = index;
  return c;
}

int ChunkTable::unmap_all(int slot) {
  const auto idx = indices(slot);
  for (auto it = idx.rbegin(); it != idx.rend(); ++it) unmap(slot, *it);
  return static_cast<int>(idx.size());
}

void ChunkTable::free() {
  for (auto& row : rows_) row.clear();
  std::fill(counts_.begin(), counts_.end(), 0);
  std::fill(ready_.begin(), ready_.end(), 0);
  refs_.clear();
  mapped_total_ = 0;
  range_->free();
}

std::string ChunkTable::check() const {
  std::map<std::size_t, std::uint64_t> expect;
  std::unordered_map<std::uint64_t, int> counted;
  for (int slot = 0; slot < static_cast<int>(rows_.size()); ++slot) {
    const auto& row = rows_[slot];
    if (!row.empty() && !row.back()) return "slot " + std::to_string(slot) + ": trailing hole in its table";
    std::int64_t r = 0;
    while (r < static_cast<std::int64_t>(row.size()) && row[r]) ++r;
    if (ready_[slot] != r) {
      return "slot " + std::to_string(slot) + ": ready=" + std::to_string(ready_[slot]) + " but " +
             std::to_string(r) + " leading chunks are mapped";
    }
    int n = 0;
    for (std::size_t i = 0; i < row.size(); ++i) {
      if (!row[i]) continue;
      expect[layout_.chunk_offset(slot, static_cast<std::int64_t>(i))] = row[i]->id();
      ++counted[row[i]->id()];
      ++n;
    }
    if (n != counts_[slot]) return "slot " + std::to_string(slot) + ": count " + std::to_string(counts_[slot]) +
                                   " but " + std::to_string(n) + " chunks in its table";
  }
  const auto actual = range_->mappings();
  if (actual.size() != expect.size()) {
    return "the range has " + std::to_string(actual.size()) + " mappings, the tables " + std::to_string(expect.size());
  }
  for (const Mapping& m : actual) {
    auto it = expect.find(m.offset);
    if (it == expect.end() || it->second != m.chunk->id()) {
      return "the range maps chunk #" + std::to_string(m.chunk->id()) + " at offset " + std::to_string(m.offset) +
             ", the tables do not";
    }
    if (m.chunk->mappings() != refs(m.chunk->id())) {
      return "chunk #" + std::to_string(m.chunk->id()) + ": " + std::to_string(m.chunk->mappings()) +
             " mappings, tables say " + std::to_string(refs(m.chunk->id()));
    }
  }
  if (counted != refs_) return "refcounts differ from the tables";
  if (mapped_total_ != expect.size()) return "mapped_total=" + std::to_string(mapped_total_) + ", tables hold " +
                                             std::to_string(expect.size());
  if (range_->mapped_bytes() != expect.size() * static_cast<std::size_t>(layout_.chunk_bytes)) {
    return "range.mapped_bytes disagrees with the tables";
  }
  return "";
}

}  // namespace glake::kvcache
