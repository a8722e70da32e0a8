fn main() {
    outrun::store::sqlite::tune_library();
    outrun::cli::main()
}
